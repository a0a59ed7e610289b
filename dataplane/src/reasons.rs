//! Drop reasons, with the wire values of `session.reasons.DropReason`.

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DropReason {
    Truncated = 1,
    Oversized = 2,
    BadVersion = 3,
    UnknownType = 4,
    Malformed = 5,
    BadAead = 6,
    Replayed = 7,
    StaleEpoch = 8,
    UnknownSession = 9,
    NotValidated = 12,
    Unexpected = 14,
    QueueFull = 16,
    LeaseExpired = 17,
    UntrustedPrefix = 19,
    MissingPrefix = 20,
}

impl DropReason {
    pub const ALL: [DropReason; 15] = [
        DropReason::Truncated,
        DropReason::Oversized,
        DropReason::BadVersion,
        DropReason::UnknownType,
        DropReason::Malformed,
        DropReason::BadAead,
        DropReason::Replayed,
        DropReason::StaleEpoch,
        DropReason::UnknownSession,
        DropReason::NotValidated,
        DropReason::Unexpected,
        DropReason::QueueFull,
        DropReason::LeaseExpired,
        DropReason::UntrustedPrefix,
        DropReason::MissingPrefix,
    ];

    pub fn code(self) -> u8 {
        self as u8
    }

    /// Which family of error the Python core raises for it.
    pub fn kind(self) -> ErrorKind {
        match self {
            DropReason::BadAead => ErrorKind::Auth,
            DropReason::Replayed | DropReason::StaleEpoch => ErrorKind::Replay,
            _ => ErrorKind::Decode,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    Decode,
    Auth,
    Replay,
}
