//! The cleartext layout of DATA packets, as `session/wire.py` defines it.
//!
//! Every message starts with `version u8 | type u8 | flags u16 (zero) | session_id 16`;
//! a DATA packet goes on with `epoch u32 | counter u64` (big-endian) and the AEAD
//! ciphertext (inner message and 16-byte tag). Parsing is strict and bounded: a datagram
//! either yields a header or a `DropReason`, with the same reason, checked in the same
//! order, as the Python codec's `peek_header` and `decode`.

use crate::reasons::DropReason;

pub const PROTOCOL_VERSION: u8 = 1;
pub const SESSION_ID_LEN: usize = 16;
pub const HEADER_LEN: usize = 20;
pub const AEAD_TAG_LEN: usize = 16;
pub const MAX_MESSAGE_SIZE: usize = 2048;
/// header | epoch | counter: the cleartext the AEAD tag also covers
pub const DATA_PREFIX_LEN: usize = HEADER_LEN + 4 + 8;
/// the shortest DATA packet: prefix, one inner byte, tag
pub const DATA_MIN_LEN: usize = DATA_PREFIX_LEN + AEAD_TAG_LEN + 1;
/// the largest inner message a DATA packet can carry
pub const MAX_INNER_LEN: usize = MAX_MESSAGE_SIZE - DATA_MIN_LEN + 1;

pub type SessionId = [u8; SESSION_ID_LEN];

/// Message types (wire values of `session.wire.MessageType`).
pub const TYPE_DATA: u8 = 4;
const MAX_TYPE: u8 = 8;

/// Inner message types (first plaintext byte, `session.wire.InnerType`).
pub const INNER_PAYLOAD: u8 = 1;
/// `flow u16 | datagram`: UDP-forward mode, one flow per local source of the agent.
pub const INNER_FLOW_PAYLOAD: u8 = 9;
/// Flow ids are 1..=MAX_FLOWS (`session.wire.MAX_FLOWS`).
pub const MAX_FLOWS: u16 = 256;
/// Bytes before a FLOW_PAYLOAD's datagram: the inner type and the flow id.
pub const FLOW_PREFIX_LEN: usize = 3;
/// The largest datagram a PAYLOAD or a FLOW_PAYLOAD carries (`session.wire.MAX_PAYLOAD_SIZE`).
pub const MAX_PAYLOAD_SIZE: usize = 1500;

/// A decrypted inner message that carries a datagram: `(flow, offset of the datagram)`,
/// flow 0 for a plain PAYLOAD; `None` for any other inner message, and for a PAYLOAD or
/// FLOW_PAYLOAD that `wire.decode_inner` refuses (truncated, oversized, a flow outside
/// 1..=MAX_FLOWS): the machine sees those and counts them.
pub fn inner_datagram(plain: &[u8]) -> Option<(u16, usize)> {
    match plain.first() {
        Some(&INNER_PAYLOAD) if plain.len() - 1 <= MAX_PAYLOAD_SIZE => Some((0, 1)),
        Some(&INNER_FLOW_PAYLOAD) if plain.len() >= FLOW_PREFIX_LEN
            && plain.len() - FLOW_PREFIX_LEN <= MAX_PAYLOAD_SIZE =>
        {
            let flow = u16::from_be_bytes([plain[1], plain[2]]);
            (1..=MAX_FLOWS).contains(&flow).then_some((flow, FLOW_PREFIX_LEN))
        }
        _ => None,
    }
}

/// Write the inner prefix of a datagram of `flow` (0: a plain PAYLOAD) at `out[0..]`;
/// returns its length.
pub fn write_inner_prefix(out: &mut [u8], flow: u16) -> usize {
    if flow == 0 {
        out[0] = INNER_PAYLOAD;
        1
    } else {
        out[0] = INNER_FLOW_PAYLOAD;
        out[1..FLOW_PREFIX_LEN].copy_from_slice(&flow.to_be_bytes());
        FLOW_PREFIX_LEN
    }
}

/// The fixed header of any message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub mtype: u8,
    pub session_id: SessionId,
}

/// The cleartext fields of a DATA packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataHeader {
    pub session_id: SessionId,
    pub epoch: u32,
    pub counter: u64,
}

/// Validate the fixed header (`wire.peek_header`).
pub fn peek_header(data: &[u8]) -> Result<Header, DropReason> {
    let n = data.len();
    if n > MAX_MESSAGE_SIZE {
        return Err(DropReason::Oversized);
    }
    if n < HEADER_LEN {
        return Err(DropReason::Truncated);
    }
    if data[0] != PROTOCOL_VERSION {
        return Err(DropReason::BadVersion);
    }
    if data[2] != 0 || data[3] != 0 {
        return Err(DropReason::Malformed);
    }
    let mtype = data[1];
    if mtype == 0 || mtype > MAX_TYPE {
        return Err(DropReason::UnknownType);
    }
    let mut session_id = [0u8; SESSION_ID_LEN];
    session_id.copy_from_slice(&data[4..HEADER_LEN]);
    Ok(Header { mtype, session_id })
}

/// Parse a DATA packet's cleartext prefix (`wire.decode` for DATA); anything that is a
/// valid message of another type is `Unexpected`.
pub fn parse_data(data: &[u8]) -> Result<DataHeader, DropReason> {
    let h = peek_header(data)?;
    if h.mtype != TYPE_DATA {
        return Err(DropReason::Unexpected);
    }
    if data.len() < DATA_MIN_LEN {
        return Err(DropReason::Truncated);
    }
    let epoch = u32::from_be_bytes(data[HEADER_LEN..HEADER_LEN + 4].try_into().expect("4 bytes"));
    let counter = u64::from_be_bytes(data[HEADER_LEN + 4..DATA_PREFIX_LEN].try_into().expect("8 bytes"));
    Ok(DataHeader { session_id: h.session_id, epoch, counter })
}

/// Write a DATA packet's cleartext prefix into `out[..DATA_PREFIX_LEN]`.
pub fn write_data_prefix(out: &mut [u8], session_id: &SessionId, epoch: u32, counter: u64) {
    out[0] = PROTOCOL_VERSION;
    out[1] = TYPE_DATA;
    out[2] = 0;
    out[3] = 0;
    out[4..HEADER_LEN].copy_from_slice(session_id);
    out[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&epoch.to_be_bytes());
    out[HEADER_LEN + 4..DATA_PREFIX_LEN].copy_from_slice(&counter.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        write_data_prefix(&mut v, &[7u8; 16], 3, 9);
        v
    }

    #[test]
    fn reasons_in_codec_order() {
        assert_eq!(peek_header(&vec![9u8; MAX_MESSAGE_SIZE + 1]), Err(DropReason::Oversized));
        assert_eq!(peek_header(&[1u8; 19]), Err(DropReason::Truncated));
        let mut v = data(DATA_MIN_LEN);
        assert_eq!(parse_data(&v).unwrap(), DataHeader { session_id: [7; 16], epoch: 3, counter: 9 });
        v[0] = 2;
        assert_eq!(parse_data(&v), Err(DropReason::BadVersion));
        v[0] = 1;
        v[3] = 1;
        assert_eq!(parse_data(&v), Err(DropReason::Malformed));
        v[3] = 0;
        v[1] = 9;
        assert_eq!(parse_data(&v), Err(DropReason::UnknownType));
        v[1] = 5;
        assert_eq!(parse_data(&v), Err(DropReason::Unexpected));
        assert_eq!(parse_data(&data(DATA_MIN_LEN - 1)), Err(DropReason::Truncated));
    }

    #[test]
    fn inner_datagrams_as_decode_inner() {
        assert_eq!(inner_datagram(&[INNER_PAYLOAD]), Some((0, 1)));
        assert_eq!(inner_datagram(&[INNER_PAYLOAD; 1 + MAX_PAYLOAD_SIZE]), Some((0, 1)));
        assert_eq!(inner_datagram(&[INNER_PAYLOAD; 2 + MAX_PAYLOAD_SIZE]), None);
        assert_eq!(inner_datagram(&[INNER_FLOW_PAYLOAD, 0, 7, 42]), Some((7, 3)));
        assert_eq!(inner_datagram(&[INNER_FLOW_PAYLOAD, 1, 0]), Some((256, 3)));
        assert_eq!(inner_datagram(&[INNER_FLOW_PAYLOAD, 1, 1]), None); // flow 257
        assert_eq!(inner_datagram(&[INNER_FLOW_PAYLOAD, 0, 0, 1]), None); // flow 0
        assert_eq!(inner_datagram(&[INNER_FLOW_PAYLOAD, 0]), None); // truncated
        let mut big = vec![0u8; FLOW_PREFIX_LEN + MAX_PAYLOAD_SIZE + 1];
        write_inner_prefix(&mut big, 3);
        assert_eq!(inner_datagram(&big), None);
        assert_eq!(inner_datagram(&big[..big.len() - 1]), Some((3, 3)));
        assert_eq!(inner_datagram(&[2, 0, 0]), None);
        assert_eq!(inner_datagram(&[]), None);
        let mut out = [0u8; 3];
        assert_eq!(write_inner_prefix(&mut out, 0), 1);
        assert_eq!(out[0], INNER_PAYLOAD);
        assert_eq!(write_inner_prefix(&mut out, 300), 3);
        assert_eq!(out, [INNER_FLOW_PAYLOAD, 1, 44]);
    }
}
