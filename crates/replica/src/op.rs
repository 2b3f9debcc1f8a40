//! The volume operations carried in Raft entries, and their checksummed
//! encoding. Entries come from disk and from peers, so decoding trusts
//! nothing: version, kind, lengths and crc32c are all checked.
//!
//! Layout (little endian): version u8 | kind u8 | epoch u64 | a u64 | b u64 |
//! crc32c u32 over everything else | payload. For a write, `a` is the
//! offset, `b` the payload length; for zeroing, offset and length; for an
//! attach, the node id and 0.

use bytes::{BufMut, Bytes, BytesMut};

pub const FORMAT_VERSION: u8 = 1;
pub const HEADER_BYTES: usize = 30;
/// Largest write payload in one entry: one NBD maximum payload.
pub const MAX_WRITE_BYTES: u64 = 32 * 1024 * 1024;

const KIND_WRITE: u8 = 1;
const KIND_ZERO: u8 = 2;
const KIND_ATTACH: u8 = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeOp {
    /// Overwrite `data.len()` bytes at `offset`.
    Write { offset: u64, data: Bytes },
    /// Zero (and, where the image allows, deallocate) a range.
    Zero { offset: u64, length: u64 },
    /// Bind the volume's writer to `node_id`, starting a new epoch; writes
    /// carrying an older epoch are refused from then on (fencing).
    Attach { node_id: u64 },
}

/// An operation as stored in an entry: the op and the writer epoch it was
/// issued under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryOp {
    pub epoch: u64,
    pub op: VolumeOp,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("entry of {0} bytes is shorter than the {HEADER_BYTES}-byte header")]
    Truncated(usize),
    #[error("entry format version {0} is not supported (expected {FORMAT_VERSION})")]
    Version(u8),
    #[error("unknown entry kind {0}")]
    Kind(u8),
    #[error("entry checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("entry payload is {actual} bytes but the header says {declared}")]
    Length { declared: u64, actual: usize },
    #[error("entry range offset {offset} length {length} overflows")]
    Range { offset: u64, length: u64 },
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

impl EntryOp {
    pub fn encode(&self) -> Vec<u8> {
        let (kind, a, b, payload): (u8, u64, u64, &[u8]) = match &self.op {
            VolumeOp::Write { offset, data } => (KIND_WRITE, *offset, data.len() as u64, data),
            VolumeOp::Zero { offset, length } => (KIND_ZERO, *offset, *length, &[]),
            VolumeOp::Attach { node_id } => (KIND_ATTACH, *node_id, 0, &[]),
        };
        let mut out = BytesMut::with_capacity(HEADER_BYTES + payload.len());
        out.put_u8(FORMAT_VERSION);
        out.put_u8(kind);
        out.put_u64_le(self.epoch);
        out.put_u64_le(a);
        out.put_u64_le(b);
        let mut crc = crc32c::crc32c(&out[..26]);
        crc = crc32c::crc32c_append(crc, payload);
        out.put_u32_le(crc);
        out.put_slice(payload);
        out.to_vec()
    }

    /// Decodes and verifies an entry. `data` is shared, not copied.
    pub fn decode(data: &Bytes) -> Result<EntryOp, DecodeError> {
        if data.len() < HEADER_BYTES {
            return Err(DecodeError::Truncated(data.len()));
        }
        if data[0] != FORMAT_VERSION {
            return Err(DecodeError::Version(data[0]));
        }
        let kind = data[1];
        let epoch = le_u64(&data[2..]);
        let a = le_u64(&data[10..]);
        let b = le_u64(&data[18..]);
        let stored = u32::from_le_bytes([data[26], data[27], data[28], data[29]]);
        let payload = data.slice(HEADER_BYTES..);
        let computed = crc32c::crc32c_append(crc32c::crc32c(&data[..26]), &payload);
        if stored != computed {
            return Err(DecodeError::Checksum { stored, computed });
        }
        let op = match kind {
            KIND_WRITE => {
                if b != payload.len() as u64 || b > MAX_WRITE_BYTES {
                    return Err(DecodeError::Length {
                        declared: b,
                        actual: payload.len(),
                    });
                }
                if a.checked_add(b).is_none() {
                    return Err(DecodeError::Range { offset: a, length: b });
                }
                VolumeOp::Write {
                    offset: a,
                    data: payload,
                }
            }
            KIND_ZERO => {
                if !payload.is_empty() {
                    return Err(DecodeError::Length {
                        declared: 0,
                        actual: payload.len(),
                    });
                }
                if a.checked_add(b).is_none() {
                    return Err(DecodeError::Range { offset: a, length: b });
                }
                VolumeOp::Zero { offset: a, length: b }
            }
            KIND_ATTACH => {
                if !payload.is_empty() {
                    return Err(DecodeError::Length {
                        declared: 0,
                        actual: payload.len(),
                    });
                }
                VolumeOp::Attach { node_id: a }
            }
            other => return Err(DecodeError::Kind(other)),
        };
        Ok(EntryOp { epoch, op })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn write(offset: u64, data: &'static [u8]) -> EntryOp {
        EntryOp {
            epoch: 3,
            op: VolumeOp::Write {
                offset,
                data: Bytes::from_static(data),
            },
        }
    }

    #[test]
    fn every_kind_round_trips() {
        for e in [
            write(4096, b"hello"),
            EntryOp {
                epoch: 1,
                op: VolumeOp::Zero {
                    offset: 0,
                    length: 1 << 30,
                },
            },
            EntryOp {
                epoch: 9,
                op: VolumeOp::Attach { node_id: 2 },
            },
        ] {
            assert_eq!(EntryOp::decode(&Bytes::from(e.encode())), Ok(e));
        }
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let good = write(12345, b"some payload").encode();
        for i in 0..good.len() {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[i] ^= 1 << bit;
                assert!(
                    EntryOp::decode(&Bytes::from(bad)).is_err(),
                    "flip of bit {bit} in byte {i} unnoticed"
                );
            }
        }
    }

    #[test]
    fn truncation_and_bad_lengths_are_refused() {
        let good = write(0, b"abcdef").encode();
        assert_eq!(
            EntryOp::decode(&Bytes::from(good[..10].to_vec())),
            Err(DecodeError::Truncated(10))
        );
        assert!(EntryOp::decode(&Bytes::from(good[..good.len() - 1].to_vec())).is_err());
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = EntryOp::decode(&Bytes::from(bytes));
        }

        #[test]
        fn writes_round_trip(epoch: u64, offset in 0u64..(1 << 50), data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let e = EntryOp { epoch, op: VolumeOp::Write { offset, data: Bytes::from(data) } };
            prop_assert_eq!(EntryOp::decode(&Bytes::from(e.encode())), Ok(e));
        }
    }
}
