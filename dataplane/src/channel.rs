//! AEAD framing of DATA packets for one binding, the same as `session/framing.py`.
//!
//! A DATA packet is `header 20 | epoch u32 | counter u64 | ChaCha20-Poly1305(inner)`; the
//! nonce is `0u32 | counter u64 little-endian` and the associated data is the whole
//! cleartext prefix. Receive order follows WireGuard: epoch, session, replay check (before
//! any crypto), decrypt, and only then mark the counter, so a forgery never moves the
//! window. No I/O and no allocation: the caller owns every buffer.

use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, CHACHA20_POLY1305};

use crate::reasons::DropReason;
use crate::replay::ReplayWindow;
use crate::wire::{self, SessionId, AEAD_TAG_LEN, DATA_PREFIX_LEN, MAX_INNER_LEN};

/// Rekey (a new epoch) long before the nonce space ends, as WireGuard.
pub const REJECT_AFTER_MESSAGES: u64 = 1 << 60;

#[derive(Debug, PartialEq, Eq)]
pub enum SealError {
    /// The send counter reached `REJECT_AFTER_MESSAGES`: the machine must start a new epoch.
    Exhausted,
    /// The inner message is empty or larger than a DATA packet can carry.
    BadLength(usize),
    /// The output buffer is too small.
    NoRoom,
}

#[derive(Debug, PartialEq, Eq)]
pub enum KeyError {
    SameKeys,
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

fn key(bytes: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, bytes).expect("a 32-byte key"))
}

fn tag(bytes: &[u8]) -> Tag {
    Tag::try_from(bytes).expect("an AEAD_TAG_LEN-byte tag")
}

/// One side of one binding: seal with the send key, open with the receive key.
pub struct Channel {
    pub session_id: SessionId,
    pub epoch: u32,
    send: LessSafeKey,
    recv: LessSafeKey,
    send_counter: u64,
    window: ReplayWindow,
    pub packets_sent: u64,
    pub bytes_sent: u64,
    pub packets_received: u64,
    pub bytes_received: u64,
}

impl Channel {
    pub fn new(send_key: &[u8; 32], recv_key: &[u8; 32], session_id: SessionId, epoch: u32) -> Result<Self, KeyError> {
        if send_key == recv_key {
            return Err(KeyError::SameKeys); // nonce reuse across directions
        }
        Ok(Channel {
            session_id,
            epoch,
            send: key(send_key),
            recv: key(recv_key),
            send_counter: 0,
            window: ReplayWindow::new(),
            packets_sent: 0,
            bytes_sent: 0,
            packets_received: 0,
            bytes_received: 0,
        })
    }

    pub fn next_send_counter(&self) -> u64 {
        self.send_counter
    }

    pub fn highest_received(&self) -> Option<u64> {
        self.window.highest()
    }

    /// Encrypt `inner` into a complete DATA packet in `out`; returns its length.
    pub fn seal_into(&mut self, inner: &[u8], out: &mut [u8]) -> Result<usize, SealError> {
        let len = inner.len();
        if len == 0 || len > MAX_INNER_LEN {
            return Err(SealError::BadLength(len));
        }
        let total = DATA_PREFIX_LEN + len + AEAD_TAG_LEN;
        if out.len() < total {
            return Err(SealError::NoRoom);
        }
        out[DATA_PREFIX_LEN..DATA_PREFIX_LEN + len].copy_from_slice(inner);
        self.seal_in_place(out, len)
    }

    /// Seal the `len` inner bytes already at `buf[DATA_PREFIX_LEN..]` (no copy).
    pub fn seal_in_place(&mut self, buf: &mut [u8], len: usize) -> Result<usize, SealError> {
        if len == 0 || len > MAX_INNER_LEN {
            return Err(SealError::BadLength(len));
        }
        let total = DATA_PREFIX_LEN + len + AEAD_TAG_LEN;
        if buf.len() < total {
            return Err(SealError::NoRoom);
        }
        let n = self.send_counter;
        if n >= REJECT_AFTER_MESSAGES {
            return Err(SealError::Exhausted);
        }
        self.send_counter = n + 1; // before encrypting: a counter is never used twice
        let (prefix, rest) = buf.split_at_mut(DATA_PREFIX_LEN);
        wire::write_data_prefix(prefix, &self.session_id, self.epoch, n);
        let tag = self
            .send
            .seal_in_place_separate_tag(nonce(n), Aad::from(&*prefix), &mut rest[..len])
            .expect("a DATA packet is far below ChaCha20-Poly1305's length limit");
        rest[len..len + AEAD_TAG_LEN].copy_from_slice(tag.as_ref());
        self.packets_sent += 1;
        self.bytes_sent += total as u64;
        Ok(total)
    }

    /// Authenticate and decrypt the DATA packet in `buf` in place; returns the plaintext's
    /// range in `buf`. With `commit` false nothing changes (neither window nor counters):
    /// the packet is verified for a caller that hands it on to be opened for real.
    pub fn open_in_place(&mut self, buf: &mut [u8], commit: bool) -> Result<std::ops::Range<usize>, DropReason> {
        let h = wire::parse_data(buf)?;
        self.open_parsed(&h, buf, commit)
    }

    /// `open_in_place` for a packet whose header was already parsed from `buf`.
    pub fn open_parsed(
        &mut self,
        h: &wire::DataHeader,
        buf: &mut [u8],
        commit: bool,
    ) -> Result<std::ops::Range<usize>, DropReason> {
        if h.epoch != self.epoch {
            return Err(DropReason::StaleEpoch);
        }
        if h.session_id != self.session_id {
            return Err(DropReason::UnknownSession);
        }
        let n = h.counter;
        if n >= REJECT_AFTER_MESSAGES || !self.window.check(n) {
            return Err(DropReason::Replayed);
        }
        let total = buf.len();
        let end = total - AEAD_TAG_LEN;
        if commit {
            // a refused packet's ciphertext may be left overwritten: it is dropped anyway
            let t = tag(&buf[end..]);
            let (prefix, rest) = buf.split_at_mut(DATA_PREFIX_LEN);
            self.recv
                .open_in_place_separate_tag(nonce(n), Aad::from(&*prefix), t, &mut rest[..end - DATA_PREFIX_LEN], 0..)
                .map_err(|_| DropReason::BadAead)?;
            if !self.accept(n, total) {
                return Err(DropReason::Replayed); // unreachable: check() passed just above
            }
        } else {
            // verify on a copy: the caller hands the packet on unchanged
            let mut scratch = [0u8; wire::MAX_MESSAGE_SIZE];
            self.open_into(h, buf, &mut scratch)?;
        }
        Ok(DATA_PREFIX_LEN..end)
    }

    /// Verify and decrypt the DATA packet `pkt` (header `h`) into `out[..len]`, changing
    /// nothing: the window is marked only by `accept`, once the caller keeps the packet.
    /// Returns the plaintext's length.
    pub fn open_into(&self, h: &wire::DataHeader, pkt: &[u8], out: &mut [u8]) -> Result<usize, DropReason> {
        if h.epoch != self.epoch {
            return Err(DropReason::StaleEpoch);
        }
        if h.session_id != self.session_id {
            return Err(DropReason::UnknownSession);
        }
        if h.counter >= REJECT_AFTER_MESSAGES || !self.window.check(h.counter) {
            return Err(DropReason::Replayed);
        }
        let end = pkt.len() - AEAD_TAG_LEN;
        let len = end - DATA_PREFIX_LEN;
        if out.len() < len {
            return Err(DropReason::Oversized);
        }
        out[..len].copy_from_slice(&pkt[DATA_PREFIX_LEN..end]);
        self.recv
            .open_in_place_separate_tag(nonce(h.counter), Aad::from(&pkt[..DATA_PREFIX_LEN]), tag(&pkt[end..]), &mut out[..len], 0..)
            .map_err(|_| DropReason::BadAead)?;
        Ok(len)
    }

    /// Mark an authenticated packet's counter seen and count it; false if already seen.
    pub fn accept(&mut self, counter: u64, wire_len: usize) -> bool {
        if !self.window.update(counter) {
            return false;
        }
        self.packets_received += 1;
        self.bytes_received += wire_len as u64;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Channel, Channel) {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        (Channel::new(&a, &b, [5; 16], 3).unwrap(), Channel::new(&b, &a, [5; 16], 3).unwrap())
    }

    #[test]
    fn round_trip_and_reasons() {
        let (mut c, mut g) = pair();
        let mut buf = [0u8; 2048];
        let n = c.seal_into(b"\x01hello", &mut buf).unwrap();
        let mut pkt = buf[..n].to_vec();
        let copy = pkt.clone();
        let r = g.open_in_place(&mut pkt, true).unwrap();
        assert_eq!(&pkt[r], b"\x01hello");
        assert_eq!(g.open_in_place(&mut copy.clone(), true), Err(DropReason::Replayed));
        let mut forged = copy.clone();
        forged[n - 1] ^= 1;
        forged[DATA_PREFIX_LEN - 1] ^= 1; // a fresh counter
        assert_eq!(g.open_in_place(&mut forged, true), Err(DropReason::BadAead));
        assert_eq!(g.highest_received(), Some(0));
        let mut stale = copy.clone();
        stale[23] = 4;
        assert_eq!(g.open_in_place(&mut stale, true), Err(DropReason::StaleEpoch));
        assert_eq!(c.seal_into(b"", &mut buf), Err(SealError::BadLength(0)));
        assert!(Channel::new(&[1; 32], &[1; 32], [0; 16], 0).is_err());
    }

    #[test]
    fn verify_without_commit_changes_nothing() {
        let (mut c, mut g) = pair();
        let mut buf = [0u8; 64];
        let n = c.seal_into(b"\x02abc", &mut buf).unwrap();
        let mut pkt = buf[..n].to_vec();
        let orig = pkt.clone();
        g.open_in_place(&mut pkt, false).unwrap();
        assert_eq!(pkt, orig);
        assert_eq!(g.highest_received(), None);
        assert!(g.open_in_place(&mut pkt, true).is_ok());
    }
}
