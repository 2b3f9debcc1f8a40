//! The volume operations carried in Raft entries, and their checksummed
//! encoding. Entries come from disk and from peers, so decoding trusts
//! nothing: version, kind, lengths and crc32c are all checked.
//!
//! Layout (little endian): version u8 | kind u8 | epoch u64 | a u64 | b u64 |
//! crc32c u32 over everything else | payload. For a write, `a` is the
//! offset, `b` the payload length; for zeroing, offset and length; for an
//! attach, the node id and 0.

use bytes::{BufMut, Bytes};

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
        // A Vec, because raft-rs takes the entry's data as one, and so the
        // payload is copied once, here, on its way into the log.
        let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
        out.put_u8(FORMAT_VERSION);
        out.put_u8(kind);
        out.put_u64_le(self.epoch);
        out.put_u64_le(a);
        out.put_u64_le(b);
        let mut crc = crc32c::crc32c(&out[..26]);
        crc = crc32c::crc32c_append(crc, payload);
        out.put_u32_le(crc);
        out.put_slice(payload);
        out
    }

    /// Decodes and verifies an entry. `data` is shared, not copied.
    pub fn decode(data: &Bytes) -> Result<EntryOp, DecodeError> {
        Self::decode_checked(data, true)
    }

    /// Decodes an entry that [`EntryOp::encode`] made in this process and
    /// that has stayed in the same buffer since: every field is still
    /// checked, but not the checksum, which was computed over these very
    /// bytes. Anything read from disk or a peer goes through `decode`.
    pub fn decode_own(data: &Bytes) -> Result<EntryOp, DecodeError> {
        Self::decode_checked(data, false)
    }

    fn decode_checked(data: &Bytes, verify: bool) -> Result<EntryOp, DecodeError> {
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
        if verify {
            let computed = crc32c::crc32c_append(crc32c::crc32c(&data[..26]), &payload);
            if stored != computed {
                return Err(DecodeError::Checksum { stored, computed });
            }
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

    /// Hostile input: entries come from disk and from peers. The decoder
    /// must never panic, must refuse any damage to a valid entry, and must
    /// accept only canonical encodings. `PROPTEST_CASES=100000 cargo test -p
    /// trireme-replica --lib fuzz` runs them longer.
    mod fuzz {
        use super::*;

        /// `default` cases, or `PROPTEST_CASES` for a long run.
        fn cases(default: u32) -> ProptestConfig {
            let n = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok());
            ProptestConfig::with_cases(n.unwrap_or(default))
        }

        fn edge_u64() -> impl Strategy<Value = u64> {
            prop_oneof![
                any::<u64>(),
                Just(0u64),
                Just(u64::MAX),
                Just(MAX_WRITE_BYTES),
                Just(MAX_WRITE_BYTES + 1),
                (0u64..64).prop_map(|d| u64::MAX - d),
                0u64..1024,
            ]
        }

        fn entry_op() -> impl Strategy<Value = EntryOp> {
            let op = prop_oneof![
                (0u64..(1 << 50), prop::collection::vec(any::<u8>(), 0..300)).prop_map(|(offset, d)| VolumeOp::Write {
                    offset,
                    data: Bytes::from(d)
                }),
                (edge_u64(), edge_u64())
                    .prop_filter("a valid range", |(o, l)| o.checked_add(*l).is_some())
                    .prop_map(|(offset, length)| VolumeOp::Zero { offset, length }),
                edge_u64().prop_map(|node_id| VolumeOp::Attach { node_id }),
            ];
            (any::<u64>(), op).prop_map(|(epoch, op)| EntryOp { epoch, op })
        }

        /// Checks what a successful decode promises, and that the bytes were
        /// the canonical encoding of what came out.
        fn check_accepted(bytes: &[u8], e: &EntryOp) -> Result<(), TestCaseError> {
            match &e.op {
                VolumeOp::Write { offset, data } => {
                    prop_assert!(data.len() as u64 <= MAX_WRITE_BYTES);
                    prop_assert!(offset.checked_add(data.len() as u64).is_some());
                }
                VolumeOp::Zero { offset, length } => prop_assert!(offset.checked_add(*length).is_some()),
                VolumeOp::Attach { .. } => {}
            }
            let mut canonical = bytes.to_vec();
            if matches!(e.op, VolumeOp::Attach { .. }) {
                // The decoder ignores an attach's unused field `b` (always
                // written as 0); the checksum still covers it.
                canonical[18..26].fill(0);
                reseal(&mut canonical);
            }
            prop_assert_eq!(e.encode(), canonical, "accepted a non-canonical encoding");
            Ok(())
        }

        /// Recomputes the checksum, so the semantic checks behind it are
        /// reached (a peer running buggy code would send such entries).
        fn reseal(b: &mut [u8]) {
            if b.len() >= HEADER_BYTES {
                let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..26]), &b[HEADER_BYTES..]);
                b[26..30].copy_from_slice(&crc.to_le_bytes());
            }
        }

        #[derive(Debug, Clone)]
        enum Mutation {
            Flip { at: prop::sample::Index, mask: u8 },
            Truncate { at: prop::sample::Index },
            Extend { bytes: Vec<u8> },
            Overwrite { at: prop::sample::Index, bytes: Vec<u8> },
        }

        fn mutation() -> impl Strategy<Value = Mutation> {
            prop_oneof![
                (any::<prop::sample::Index>(), 1u8..=255).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
                any::<prop::sample::Index>().prop_map(|at| Mutation::Truncate { at }),
                prop::collection::vec(any::<u8>(), 1..16).prop_map(|bytes| Mutation::Extend { bytes }),
                (any::<prop::sample::Index>(), prop::collection::vec(any::<u8>(), 1..12))
                    .prop_map(|(at, bytes)| Mutation::Overwrite { at, bytes }),
            ]
        }

        fn apply(b: &mut Vec<u8>, m: &Mutation) {
            if b.is_empty() {
                return;
            }
            match m {
                Mutation::Flip { at, mask } => {
                    let i = at.index(b.len());
                    b[i] ^= mask;
                }
                Mutation::Truncate { at } => {
                    let n = at.index(b.len());
                    b.truncate(n);
                }
                Mutation::Extend { bytes } => b.extend_from_slice(bytes),
                Mutation::Overwrite { at, bytes } => {
                    let start = at.index(b.len());
                    for (slot, x) in b[start..].iter_mut().zip(bytes) {
                        *slot = *x;
                    }
                }
            }
        }

        proptest! {
            #![proptest_config(cases(256))]

            #[test]
            fn fuzz_decode_arbitrary_bytes(
                version in prop_oneof![Just(FORMAT_VERSION), any::<u8>()],
                kind in prop_oneof![1u8..=3, any::<u8>()],
                rest in prop::collection::vec(any::<u8>(), 0..100),
                sealed: bool,
            ) {
                let mut bytes = vec![version, kind];
                bytes.extend_from_slice(&rest);
                if sealed {
                    reseal(&mut bytes);
                }
                if let Ok(e) = EntryOp::decode(&Bytes::from(bytes.clone())) {
                    check_accepted(&bytes, &e)?;
                }
            }

            #[test]
            fn fuzz_round_trip(e in entry_op()) {
                let bytes = e.encode();
                prop_assert_eq!(EntryOp::decode(&Bytes::from(bytes)), Ok(e));
            }

            #[test]
            fn fuzz_damaged_entries_are_refused(
                e in entry_op(),
                mutations in prop::collection::vec(mutation(), 1..4),
            ) {
                let good = e.encode();
                let mut bad = good.clone();
                for m in &mutations {
                    apply(&mut bad, m);
                }
                match EntryOp::decode(&Bytes::from(bad.clone())) {
                    Ok(got) => {
                        prop_assert_eq!(&bad, &good, "damage went unnoticed");
                        prop_assert_eq!(got, e);
                    }
                    Err(err) => prop_assert_ne!(&bad, &good, "a valid entry was refused: {}", err),
                }
            }

            #[test]
            fn fuzz_resealed_entries_pass_only_semantic_checks(
                e in entry_op(),
                mutations in prop::collection::vec(mutation(), 1..4),
                fields in prop::collection::vec((0usize..30, any::<u8>()), 0..4),
            ) {
                let mut bad = e.encode();
                for m in &mutations {
                    apply(&mut bad, m);
                }
                for (at, x) in fields {
                    if let Some(slot) = bad.get_mut(at) {
                        *slot = x;
                    }
                }
                reseal(&mut bad);
                match EntryOp::decode(&Bytes::from(bad.clone())) {
                    Ok(got) => check_accepted(&bad, &got)?,
                    Err(DecodeError::Checksum { .. }) => {
                        prop_assert!(bad.len() < HEADER_BYTES, "a resealed entry failed its checksum");
                    }
                    Err(_) => {}
                }
            }
        }
    }
}
