//! Small state files of our own: magic, version, body, crc32c. Written to a
//! temporary file, fsynced, renamed over the old one, and the directory
//! fsynced, so a crash leaves either the old file or the new one, whole.
//!
//! Layout: magic (8 bytes) | version (u32 LE) | body length (u32 LE) | body |
//! crc32c of everything before it (u32 LE).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;

use crate::{Result, StorageError};

/// Bodies are small metadata; anything larger is corruption.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
const HEADER_BYTES: usize = 16;

pub fn encode(magic: &[u8; 8], version: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + body.len() + 4);
    out.extend_from_slice(magic);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Checks magic, length and checksum; returns the version and the body.
/// Every refusal names the file and the byte offset where it went wrong.
pub fn decode<'a>(path: &Path, magic: &[u8; 8], bytes: &'a [u8]) -> Result<(u32, &'a [u8])> {
    let bad = |offset: usize, reason: String| StorageError::StateFile {
        path: path.to_path_buf(),
        reason: format!("corrupt at offset {offset}: {reason}"),
    };
    if bytes.len() < HEADER_BYTES + 4 {
        return Err(bad(
            bytes.len(),
            format!(
                "truncated: {} bytes, fewer than the {} of a header and checksum",
                bytes.len(),
                HEADER_BYTES + 4
            ),
        ));
    }
    if &bytes[..8] != magic {
        return Err(bad(
            0,
            format!(
                "bad magic {:02x?}, expected {:?}",
                &bytes[..8],
                String::from_utf8_lossy(magic)
            ),
        ));
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    let len = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]) as usize;
    if len > MAX_BODY_BYTES || bytes.len() != HEADER_BYTES + len + 4 {
        // Offset 12 holds the body length; a file cut short (or grown) past
        // a sane length field is reported where its expected end was.
        let offset = if len > MAX_BODY_BYTES || bytes.len() > HEADER_BYTES + len + 4 {
            12
        } else {
            bytes.len()
        };
        let reason = if len > MAX_BODY_BYTES {
            format!("body length {len} exceeds the maximum {MAX_BODY_BYTES}")
        } else {
            format!(
                "body length {len} does not match the file size {} (expected {})",
                bytes.len(),
                HEADER_BYTES + len + 4
            )
        };
        return Err(bad(offset, reason));
    }
    let (data, crc) = bytes.split_at(HEADER_BYTES + len);
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    let actual = crc32c::crc32c(data);
    if stored != actual {
        return Err(bad(
            data.len(),
            format!(
                "checksum mismatch: stored {stored:#010x}, computed {actual:#010x} over bytes 0..{}",
                data.len()
            ),
        ));
    }
    Ok((version, &data[HEADER_BYTES..]))
}

pub fn read(path: &Path, magic: &[u8; 8]) -> Result<(u32, Vec<u8>)> {
    let bytes = fs::read(path).map_err(|source| StorageError::File {
        path: path.to_path_buf(),
        source,
    })?;
    let (version, body) = decode(path, magic, &bytes)?;
    Ok((version, body.to_vec()))
}

/// Replaces `path` atomically and durably with the encoded file.
pub fn write_atomic(path: &Path, magic: &[u8; 8], version: u32, body: &[u8]) -> Result<()> {
    let file_err = |p: &Path, source| StorageError::File {
        path: p.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    #[cfg(feature = "failpoints")]
    if let Some(e) = crate::failpoints::injected_io_error(crate::failpoints::STATE_WRITE) {
        return Err(file_err(&tmp, e));
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| file_err(&tmp, e))?;
    f.write_all(&encode(magic, version, body))
        .map_err(|e| file_err(&tmp, e))?;
    f.sync_all().map_err(|e| file_err(&tmp, e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| file_err(path, e))?;
    fsync_dir(dir)
}

/// Makes directory entries (creates, renames, removals) durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StorageError::File {
            path: dir.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAGIC: &[u8; 8] = b"TRITEST\0";

    #[test]
    fn round_trip_through_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("state");
        write_atomic(&p, MAGIC, 3, b"{\"a\":1}").expect("write");
        assert_eq!(read(&p, MAGIC).expect("read"), (3, b"{\"a\":1}".to_vec()));
        write_atomic(&p, MAGIC, 4, b"new").expect("overwrite");
        assert_eq!(read(&p, MAGIC).expect("read"), (4, b"new".to_vec()));
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        // neon's control_file test: flip each byte, the checksum (or a header check) must object.
        let good = encode(MAGIC, 1, b"some body bytes");
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            assert!(
                decode(Path::new("x"), MAGIC, &bad).is_err(),
                "flip at byte {i} went unnoticed"
            );
        }
        assert!(decode(Path::new("x"), MAGIC, &good[..good.len() - 1]).is_err());
    }

    #[test]
    fn errors_name_the_file_and_the_reason() {
        let e = decode(Path::new("/data/volume.meta"), MAGIC, b"short").expect_err("must fail");
        let msg = e.to_string();
        assert!(msg.contains("/data/volume.meta") && msg.contains("truncated"), "{msg}");
    }

    #[test]
    fn errors_name_the_offset() {
        let p = Path::new("/data/volume.state");
        let good = encode(MAGIC, 1, b"0123456789");
        let msg = |bytes: &[u8]| decode(p, MAGIC, bytes).expect_err("must fail").to_string();
        assert!(
            msg(&good[..7]).contains("corrupt at offset 7: truncated"),
            "{}",
            msg(&good[..7])
        );
        let mut bad = good.clone();
        bad[2] ^= 1;
        assert!(msg(&bad).contains("corrupt at offset 0: bad magic"), "{}", msg(&bad));
        let cut = &good[..good.len() - 3];
        let m = msg(cut);
        assert!(
            m.contains(&format!("corrupt at offset {}: body length 10", cut.len())),
            "{m}"
        );
        let mut bad = good.clone();
        bad[HEADER_BYTES + 4] ^= 0x10;
        let m = msg(&bad);
        assert!(
            m.contains("/data/volume.state") && m.contains("corrupt at offset 26: checksum mismatch"),
            "{m}"
        );
    }

    /// Hostile input: the decoder must never panic, and must refuse every
    /// damaged file (flipped bytes, truncation, growth, garbage) unless the
    /// bytes are exactly the ones written, naming the file and an offset
    /// inside it. `PROPTEST_CASES=100000 cargo test -p trireme-storage fuzz`
    /// runs them longer.
    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        const PATH: &str = "/data/volumes/00ff/volume.state";

        /// `default` cases, or `PROPTEST_CASES` for a long run.
        fn cases(default: u32) -> ProptestConfig {
            let n = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok());
            ProptestConfig::with_cases(n.unwrap_or(default))
        }

        /// A refusal must name the path and an offset within the file (or
        /// its end).
        fn assert_names_file_and_offset(err: &StorageError, len: usize) -> std::result::Result<(), TestCaseError> {
            let msg = err.to_string();
            prop_assert!(msg.contains(PATH), "{}", msg);
            let at = msg
                .split("corrupt at offset ")
                .nth(1)
                .and_then(|rest| rest.split(':').next())
                .and_then(|n| n.parse::<usize>().ok());
            prop_assert!(at.is_some_and(|o| o <= len), "no offset within the file in {:?}", msg);
            Ok(())
        }

        #[derive(Debug, Clone)]
        enum Mutation {
            /// XOR one byte with a non-zero mask.
            Flip { at: usize, mask: u8 },
            /// Cut the file at a position.
            Truncate { at: usize },
            /// Append bytes.
            Extend { bytes: Vec<u8> },
            /// Overwrite a range with other bytes.
            Overwrite { at: usize, bytes: Vec<u8> },
            /// Change the length field and fix the checksum up, so only the
            /// length check stands between the file and the caller.
            Relength { len: u32 },
        }

        fn mutation() -> impl Strategy<Value = Mutation> {
            prop_oneof![
                (any::<prop::sample::Index>(), 1u8..=255).prop_map(|(i, mask)| Mutation::Flip {
                    at: i.index(usize::MAX),
                    mask
                }),
                any::<prop::sample::Index>().prop_map(|i| Mutation::Truncate {
                    at: i.index(usize::MAX)
                }),
                prop::collection::vec(any::<u8>(), 1..16).prop_map(|bytes| Mutation::Extend { bytes }),
                (any::<prop::sample::Index>(), prop::collection::vec(any::<u8>(), 1..24)).prop_map(|(i, bytes)| {
                    Mutation::Overwrite {
                        at: i.index(usize::MAX),
                        bytes,
                    }
                }),
                prop_oneof![Just(0u32), Just(u32::MAX), Just(MAX_BODY_BYTES as u32 + 1), 0u32..200]
                    .prop_map(|len| Mutation::Relength { len }),
            ]
        }

        fn apply(good: &[u8], m: &Mutation) -> Vec<u8> {
            let mut b = good.to_vec();
            match m {
                Mutation::Flip { at, mask } => {
                    let i = at % b.len();
                    b[i] ^= mask;
                }
                Mutation::Truncate { at } => b.truncate(at % b.len()),
                Mutation::Extend { bytes } => b.extend_from_slice(bytes),
                Mutation::Overwrite { at, bytes } => {
                    let start = at % b.len();
                    for (i, x) in bytes.iter().enumerate() {
                        if let Some(slot) = b.get_mut(start + i) {
                            *slot = *x;
                        }
                    }
                }
                Mutation::Relength { len } if b.len() >= HEADER_BYTES + 4 => {
                    b[12..16].copy_from_slice(&len.to_le_bytes());
                    let end = b.len() - 4;
                    let crc = crc32c::crc32c(&b[..end]);
                    b[end..].copy_from_slice(&crc.to_le_bytes());
                }
                Mutation::Relength { .. } => {}
            }
            b
        }

        proptest! {
            #![proptest_config(cases(256))]

            #[test]
            fn fuzz_decode_arbitrary_bytes(
                prefix in prop_oneof![Just(MAGIC.to_vec()), Just(Vec::new()), Just(b"TRIVOLS\0".to_vec())],
                rest in prop::collection::vec(any::<u8>(), 0..64),
            ) {
                let mut bytes = prefix;
                bytes.extend_from_slice(&rest);
                match decode(Path::new(PATH), MAGIC, &bytes) {
                    // Accepted only if it is what `encode` writes for that body.
                    Ok((version, body)) => prop_assert_eq!(encode(MAGIC, version, body), bytes.clone()),
                    Err(e) => assert_names_file_and_offset(&e, bytes.len())?,
                }
            }

            #[test]
            fn fuzz_round_trip(version: u32, body in prop::collection::vec(any::<u8>(), 0..300)) {
                let bytes = encode(MAGIC, version, &body);
                let (v, b) = decode(Path::new(PATH), MAGIC, &bytes).expect("own encoding decodes");
                prop_assert_eq!((v, b), (version, body.as_slice()));
                // The same bytes under another magic are refused.
                prop_assert!(decode(Path::new(PATH), b"TRIOTHER", &bytes).is_err());
            }

            #[test]
            fn fuzz_mutations_of_a_valid_file_are_refused(
                version in 0u32..4,
                body in prop::collection::vec(any::<u8>(), 0..200),
                mutations in prop::collection::vec(mutation(), 1..4),
            ) {
                let good = encode(MAGIC, version, &body);
                let mut bad = good.clone();
                for m in &mutations {
                    if bad.is_empty() {
                        break;
                    }
                    bad = apply(&bad, m);
                }
                // A relength fixes the checksum up: that forges a file
                // rather than damaging one, and a forged file may be valid.
                let forged = mutations.iter().any(|m| matches!(m, Mutation::Relength { .. }));
                match decode(Path::new(PATH), MAGIC, &bad) {
                    Ok((v, b)) if forged => prop_assert_eq!(encode(MAGIC, v, b), bad.clone()),
                    Ok(_) => prop_assert_eq!(&bad, &good, "a damaged file was accepted"),
                    Err(e) => {
                        prop_assert_ne!(&bad, &good, "the original was refused: {}", e);
                        assert_names_file_and_offset(&e, bad.len())?;
                    }
                }
            }
        }

        proptest! {
            // Real files: fewer cases, each one writes a file.
            #![proptest_config(cases(32))]

            #[test]
            fn fuzz_read_refuses_damaged_files_by_path(
                body in prop::collection::vec(any::<u8>(), 0..100),
                m in mutation(),
            ) {
                let dir = tempfile::tempdir().expect("tempdir");
                let path = dir.path().join("volume.state");
                write_atomic(&path, MAGIC, 1, &body).expect("write");
                let good = std::fs::read(&path).expect("read back");
                let bad = apply(&good, &m);
                std::fs::write(&path, &bad).expect("damage");
                match read(&path, MAGIC) {
                    Ok((1, b)) => prop_assert!(bad == good && b == body),
                    Ok(other) => prop_assert!(false, "accepted as {:?}", other),
                    Err(e) => {
                        let msg = e.to_string();
                        prop_assert!(bad != good, "{}", msg);
                        prop_assert!(msg.contains(&path.display().to_string()), "{}", msg);
                        prop_assert!(msg.contains("corrupt at offset "), "{}", msg);
                    }
                }
            }
        }
    }
}
