//! Encoding of the per-group values kept next to the entries.
//!
//! raft-engine already checksums every record it writes; the values carry
//! their own version byte and crc32c too, so that a value damaged anywhere
//! between encode and decode (or written by a future format) is refused with
//! a message naming the group and the value, not parsed into garbage.
//!
//! Layout: `version: u8 | payload | crc32c(version | payload): u32 LE`.

use raft::eraftpb::{ConfState, HardState};

use crate::LogError;

pub(crate) const KEY_HARD_STATE: &[u8] = b"hard_state";
pub(crate) const KEY_CONF_STATE: &[u8] = b"conf_state";
pub(crate) const KEY_DESTAGED: &[u8] = b"destaged_index";

const VALUE_VERSION: u8 = 1;
const CRC_LEN: usize = 4;

fn key_name(key: &[u8]) -> &'static str {
    match key {
        KEY_HARD_STATE => "hard state",
        KEY_CONF_STATE => "conf state",
        KEY_DESTAGED => "destaged index",
        _ => "value",
    }
}

fn seal(payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + payload.len() + CRC_LEN);
    v.push(VALUE_VERSION);
    v.extend_from_slice(payload);
    let crc = crc32c::crc32c(&v);
    v.extend_from_slice(&crc.to_le_bytes());
    v
}

fn open<'a>(group: u64, key: &[u8], raw: &'a [u8]) -> Result<&'a [u8], LogError> {
    let bad = |reason: String| LogError::BadValue {
        group,
        key: key_name(key),
        reason,
    };
    if raw.len() < 1 + CRC_LEN {
        return Err(bad(format!("{} bytes, too short for a sealed value", raw.len())));
    }
    let (body, crc) = raw.split_at(raw.len() - CRC_LEN);
    let mut stored = [0u8; CRC_LEN];
    stored.copy_from_slice(crc);
    let stored = u32::from_le_bytes(stored);
    let actual = crc32c::crc32c(body);
    if stored != actual {
        return Err(bad(format!(
            "crc32c mismatch: stored {stored:#010x}, computed {actual:#010x}"
        )));
    }
    match body.split_first() {
        Some((&VALUE_VERSION, payload)) => Ok(payload),
        Some((&v, _)) => Err(bad(format!(
            "unknown value version {v} (this build reads {VALUE_VERSION})"
        ))),
        None => Err(bad("empty value".to_string())),
    }
}

fn encode_message<M: protobuf::Message>(group: u64, key: &[u8], m: &M) -> Result<Vec<u8>, LogError> {
    let payload = m.write_to_bytes().map_err(|e| LogError::Encode {
        group,
        key: key_name(key),
        reason: e.to_string(),
    })?;
    Ok(seal(&payload))
}

fn decode_message<M: protobuf::Message>(group: u64, key: &[u8], raw: &[u8]) -> Result<M, LogError> {
    let payload = open(group, key, raw)?;
    M::parse_from_bytes(payload).map_err(|e| LogError::BadValue {
        group,
        key: key_name(key),
        reason: format!("protobuf: {e}"),
    })
}

pub(crate) fn encode_hard_state(group: u64, hs: &HardState) -> Result<Vec<u8>, LogError> {
    encode_message(group, KEY_HARD_STATE, hs)
}

pub(crate) fn decode_hard_state(group: u64, raw: &[u8]) -> Result<HardState, LogError> {
    decode_message(group, KEY_HARD_STATE, raw)
}

pub(crate) fn encode_conf_state(group: u64, cs: &ConfState) -> Result<Vec<u8>, LogError> {
    encode_message(group, KEY_CONF_STATE, cs)
}

pub(crate) fn decode_conf_state(group: u64, raw: &[u8]) -> Result<ConfState, LogError> {
    decode_message(group, KEY_CONF_STATE, raw)
}

pub(crate) fn encode_destaged(index: u64) -> Vec<u8> {
    seal(&index.to_le_bytes())
}

pub(crate) fn decode_destaged(group: u64, raw: &[u8]) -> Result<u64, LogError> {
    let payload = open(group, KEY_DESTAGED, raw)?;
    let bytes: [u8; 8] = payload.try_into().map_err(|_| LogError::BadValue {
        group,
        key: key_name(KEY_DESTAGED),
        reason: format!("{} payload bytes, expected 8", payload.len()),
    })?;
    Ok(u64::from_le_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip() {
        let hs = HardState {
            term: 7,
            vote: 2,
            commit: 41,
            ..Default::default()
        };
        let raw = encode_hard_state(3, &hs).unwrap();
        assert_eq!(decode_hard_state(3, &raw).unwrap(), hs);

        let cs = ConfState::from((vec![1, 2, 3], vec![4]));
        let raw = encode_conf_state(3, &cs).unwrap();
        assert_eq!(decode_conf_state(3, &raw).unwrap(), cs);

        let raw = encode_destaged(u64::MAX - 1);
        assert_eq!(decode_destaged(3, &raw).unwrap(), u64::MAX - 1);
    }

    #[test]
    fn damaged_values_are_refused_with_the_group_and_key() {
        let raw = encode_destaged(99);
        for i in 0..raw.len() {
            let mut bad = raw.clone();
            bad[i] ^= 0x40;
            let err = decode_destaged(12, &bad).unwrap_err().to_string();
            assert!(err.contains("group 12") && err.contains("destaged index"), "{err}");
        }
        let err = decode_destaged(12, &raw[..3]).unwrap_err().to_string();
        assert!(err.contains("too short"), "{err}");

        // A future version with a valid checksum is refused by name, not parsed.
        let mut future = raw.clone();
        future[0] = 9;
        let n = future.len();
        let crc = crc32c::crc32c(&future[..n - CRC_LEN]);
        future[n - CRC_LEN..].copy_from_slice(&crc.to_le_bytes());
        let err = decode_destaged(12, &future).unwrap_err().to_string();
        assert!(err.contains("unknown value version 9"), "{err}");

        let mut hs = encode_hard_state(5, &HardState::default()).unwrap();
        hs.push(0);
        let err = decode_hard_state(5, &hs).unwrap_err().to_string();
        assert!(err.contains("hard state") && err.contains("crc32c"), "{err}");
    }
}
