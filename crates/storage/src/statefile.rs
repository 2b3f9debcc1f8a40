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
pub fn decode<'a>(path: &Path, magic: &[u8; 8], bytes: &'a [u8]) -> Result<(u32, &'a [u8])> {
    let bad = |reason: String| StorageError::StateFile {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < HEADER_BYTES + 4 {
        return Err(bad(format!("truncated: {} bytes", bytes.len())));
    }
    if &bytes[..8] != magic {
        return Err(bad(format!(
            "bad magic {:02x?}, expected {:?}",
            &bytes[..8],
            String::from_utf8_lossy(magic)
        )));
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    let len = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]) as usize;
    if len > MAX_BODY_BYTES || bytes.len() != HEADER_BYTES + len + 4 {
        return Err(bad(format!(
            "body length {len} does not match the file size {}",
            bytes.len()
        )));
    }
    let (data, crc) = bytes.split_at(HEADER_BYTES + len);
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    let actual = crc32c::crc32c(data);
    if stored != actual {
        return Err(bad(format!(
            "checksum mismatch: stored {stored:#010x}, computed {actual:#010x}"
        )));
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
}
