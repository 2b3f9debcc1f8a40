//! Checks every raft-engine log file before the engine opens them.
//!
//! raft-engine's own recovery (in `TolerateTailCorruption` mode) is right
//! about torn tails but, for our contract, too quiet elsewhere:
//! - its error on a corrupt batch names neither the file nor the offset
//!   (those go only to its `log` output);
//! - it checks the entries block only of each file's last batch, so damaged
//!   entries in the middle of a file surface only when read back, without a
//!   location;
//! - it truncates a broken last batch of *any* file, and everything after the
//!   first broken batch of the last file, silently.
//!
//! So this walks raft-engine 0.4's framing itself (file header, then
//! batches of `header | entries | crc32 | items | crc32 ^ file signature`)
//! and verifies every checksum. A break in any but the last file is
//! corruption. In the last append file, a break is a torn tail only if no
//! valid batch follows it: the writer makes each batch durable before it
//! writes the next, so only the last write can be torn, and a valid batch
//! after a broken one means the broken one had been synced.
//!
//! The header's compression type is not checksummed either, and a flipped
//! one makes raft-engine decode the entries wrongly (it then panics on a
//! "hole" in its index). The log never compresses (see `engine.rs`), so any
//! type but none is damage.
//!
//! The search for a following batch trusts nothing of the broken batch but
//! the bounds of its entries block (user data, which may hold anything that
//! looks like a batch): the batch header has no checksum, so a damaged
//! length must not hide the batches after it, and a damaged version field
//! must not change which file signature the search looks for.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::LogError;

const MAGIC: &[u8] = b"RAFT-LOG-FILE-HEADER-9986AB3E47F320B394C8E84916EB0ED5";
const VERSION_LEN: usize = 8;
const ALIGNMENT_LEN: usize = 8;
const BATCH_HEADER_LEN: u64 = 16;
const CHECKSUM_LEN: u64 = 4;
const SEQ_WIDTH: usize = 16;
pub(crate) const APPEND_SUFFIX: &str = ".raftlog";
const REWRITE_SUFFIX: &str = ".rewrite";
/// Read granularity for checksumming and probing.
const CHUNK: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Queue {
    Append,
    Rewrite,
}

#[derive(Debug)]
struct LogFileName {
    queue: Queue,
    seq: u64,
    path: PathBuf,
}

/// A torn tail the engine will drop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TornTail {
    pub file: PathBuf,
    pub offset: u64,
    pub bytes: u64,
    /// Only zeroes: space preallocated for writes that never came, the
    /// normal state of the active file after a crash, not a cut write.
    pub zeroes: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Report {
    pub files: usize,
    pub batches: u64,
    pub torn: Vec<TornTail>,
    /// Files before a gap in the sequence, which raft-engine ignores
    /// (obsolete files kept for recycling).
    pub ignored: Vec<PathBuf>,
}

fn io_err(op: &'static str, path: &Path, source: io::Error) -> LogError {
    LogError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn parse_name(name: &str) -> Option<(Queue, u64)> {
    let seq = name.get(..SEQ_WIDTH)?.parse::<u64>().ok()?;
    if name.len() <= SEQ_WIDTH {
        return None;
    }
    if name.ends_with(APPEND_SUFFIX) {
        Some((Queue::Append, seq))
    } else if name.ends_with(REWRITE_SUFFIX) {
        Some((Queue::Rewrite, seq))
    } else {
        None
    }
}

fn list(dir: &Path) -> Result<Vec<LogFileName>, LogError> {
    let mut files = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(files),
        Err(e) => return Err(io_err("listing", dir, e)),
    };
    for entry in rd {
        let entry = entry.map_err(|e| io_err("listing", dir, e))?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            // raft-engine unwraps file names as UTF-8 and would panic.
            return Err(LogError::Open {
                dir: dir.to_path_buf(),
                reason: format!("unexpected file with a non-UTF-8 name: {path:?}"),
            });
        };
        if let Some((queue, seq)) = parse_name(&name) {
            files.push(LogFileName { queue, seq, path });
        }
    }
    files.sort_by_key(|f| (f.queue as u8, f.seq));
    Ok(files)
}

/// How one batch checked out.
enum Batch {
    Valid {
        len: u64,
    },
    /// `entries_end`: where the entries block (user data) ends, if the
    /// header is plausible.
    Broken {
        reason: String,
        entries_end: Option<u64>,
    },
}

fn read_exact(f: &File, path: &Path, buf: &mut [u8], off: u64) -> Result<(), LogError> {
    f.read_exact_at(buf, off).map_err(|e| io_err("reading", path, e))
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

/// crc32 (IEEE, as raft-engine uses) of `len` bytes at `off`.
fn crc_range(f: &File, path: &Path, off: u64, len: u64, buf: &mut Vec<u8>) -> Result<u32, LogError> {
    let mut h = crc32fast::Hasher::new();
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(CHUNK as u64) as usize;
        buf.resize(n, 0);
        read_exact(f, path, &mut buf[..n], off + done)?;
        h.update(&buf[..n]);
        done += n as u64;
    }
    Ok(h.finalize())
}

/// Header fields of the batch at the start of `h`, if they are plausible for
/// a batch that fits in `room` bytes.
fn plausible_header(h: &[u8], room: u64) -> Result<(u64, u64), String> {
    let len_and_type = be_u64(&h[0..8]);
    let compression = len_and_type & 0xff;
    let len = len_and_type >> 8;
    let items = be_u64(&h[8..16]);
    if compression != 0 {
        return Err(format!(
            "compression type {compression}: this log never compresses its batches"
        ));
    }
    if items < BATCH_HEADER_LEN {
        return Err(format!("item offset {items} inside the batch header"));
    }
    if items > len {
        return Err(format!("item offset {items} past the batch length {len}"));
    }
    if len > room {
        return Err(format!("batch of {len} bytes runs past the end of the file"));
    }
    if items > BATCH_HEADER_LEN && items - BATCH_HEADER_LEN <= CHECKSUM_LEN {
        return Err("entries block too short for its checksum".to_string());
    }
    if len - items <= CHECKSUM_LEN {
        return Err("item block too short for its checksum".to_string());
    }
    Ok((len, items))
}

fn check_batch(
    f: &File,
    path: &Path,
    size: u64,
    off: u64,
    signature: u32,
    buf: &mut Vec<u8>,
) -> Result<Batch, LogError> {
    let room = size - off;
    if room < BATCH_HEADER_LEN {
        return Ok(Batch::Broken {
            reason: format!("{room} bytes left, too few for a batch header"),
            entries_end: None,
        });
    }
    let mut h = [0u8; BATCH_HEADER_LEN as usize];
    read_exact(f, path, &mut h, off)?;
    let (len, items) = match plausible_header(&h, room) {
        Ok(v) => v,
        Err(reason) => {
            return Ok(Batch::Broken {
                reason,
                entries_end: None,
            });
        }
    };
    // Not `off + len`: the length is not checksummed, and a damaged one
    // would send the search for a following batch past the real ones.
    let entries_end = Some(off + items);
    if items > BATCH_HEADER_LEN {
        let data_len = items - BATCH_HEADER_LEN - CHECKSUM_LEN;
        let actual = crc_range(f, path, off + BATCH_HEADER_LEN, data_len, buf)?;
        let mut c = [0u8; CHECKSUM_LEN as usize];
        read_exact(f, path, &mut c, off + items - CHECKSUM_LEN)?;
        let stored = le_u32(&c);
        if actual != stored {
            return Ok(Batch::Broken {
                reason: format!("entries checksum mismatch: stored {stored:#010x}, computed {actual:#010x}"),
                entries_end,
            });
        }
    }
    let item_len = len - items - CHECKSUM_LEN;
    let actual = crc_range(f, path, off + items, item_len, buf)?;
    let mut c = [0u8; CHECKSUM_LEN as usize];
    read_exact(f, path, &mut c, off + len - CHECKSUM_LEN)?;
    let stored = le_u32(&c) ^ signature;
    if actual != stored {
        return Ok(Batch::Broken {
            reason: format!("item checksum mismatch: stored {stored:#010x}, computed {actual:#010x}"),
            entries_end,
        });
    }
    Ok(Batch::Valid { len })
}

fn all_zero(f: &File, path: &Path, off: u64, len: u64, buf: &mut Vec<u8>) -> Result<bool, LogError> {
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(CHUNK as u64) as usize;
        buf.resize(n, 0);
        read_exact(f, path, &mut buf[..n], off + done)?;
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        done += n as u64;
    }
    Ok(true)
}

/// The first offset at or after `from` where a whole valid batch, signed
/// with any of `signatures`, starts.
fn find_valid_batch(
    f: &File,
    path: &Path,
    size: u64,
    from: u64,
    signatures: &[u32],
    buf: &mut Vec<u8>,
) -> Result<Option<u64>, LogError> {
    let mut window = vec![0u8; CHUNK + BATCH_HEADER_LEN as usize];
    let mut base = from;
    while base + BATCH_HEADER_LEN <= size {
        let n = ((size - base) as usize).min(window.len());
        read_exact(f, path, &mut window[..n], base)?;
        let last_start = n - BATCH_HEADER_LEN as usize;
        for i in 0..=last_start {
            let off = base + i as u64;
            if plausible_header(&window[i..i + BATCH_HEADER_LEN as usize], size - off).is_err() {
                continue;
            }
            for &signature in signatures {
                if let Batch::Valid { .. } = check_batch(f, path, size, off, signature, buf)? {
                    return Ok(Some(off));
                }
            }
        }
        base += last_start as u64 + 1;
    }
    Ok(None)
}

/// Where a file's valid content ends.
enum FileEnd {
    Clean,
    /// `entries_end`: where the broken batch's entries block ends, if its
    /// header is plausible.
    Broken {
        offset: u64,
        reason: String,
        entries_end: Option<u64>,
    },
}

struct Walk {
    end: FileEnd,
    batches: u64,
    signature: u32,
}

fn walk_file(f: &File, path: &Path, seq: u64, size: u64, buf: &mut Vec<u8>) -> Result<Walk, LogError> {
    // raft-engine signs with the low 32 bits of the file sequence (format v2).
    let v2_signature = seq as u32;
    let broken = |offset, reason: String, signature| Walk {
        end: FileEnd::Broken {
            offset,
            reason,
            entries_end: None,
        },
        batches: 0,
        signature,
    };
    let short = (MAGIC.len() + VERSION_LEN) as u64;
    if size < short {
        return Ok(broken(
            0,
            format!("{size} bytes, too short for a file header"),
            v2_signature,
        ));
    }
    let mut h = [0u8; MAGIC.len() + VERSION_LEN + ALIGNMENT_LEN];
    let n = (size as usize).min(h.len());
    read_exact(f, path, &mut h[..n], 0)?;
    if &h[..MAGIC.len()] != MAGIC {
        return Ok(broken(0, "file header magic mismatch".to_string(), v2_signature));
    }
    let (header_len, signature) = match be_u64(&h[MAGIC.len()..]) {
        1 => (short, 0),
        2 => {
            if n < h.len() {
                return Ok(broken(0, "file header cut short".to_string(), v2_signature));
            }
            let alignment = be_u64(&h[MAGIC.len() + VERSION_LEN..]);
            if alignment != 0 {
                return Ok(broken(
                    0,
                    format!("block alignment {alignment}, which raft-engine 0.4 never writes"),
                    v2_signature,
                ));
            }
            (h.len() as u64, v2_signature)
        }
        v => return Ok(broken(0, format!("unknown log file version {v}"), v2_signature)),
    };
    let mut off = header_len;
    let mut batches = 0;
    while off < size {
        match check_batch(f, path, size, off, signature, buf)? {
            Batch::Valid { len } => {
                off += len;
                batches += 1;
            }
            Batch::Broken { reason, entries_end } => {
                return Ok(Walk {
                    end: FileEnd::Broken {
                        offset: off,
                        reason,
                        entries_end,
                    },
                    batches,
                    signature,
                });
            }
        }
    }
    Ok(Walk {
        end: FileEnd::Clean,
        batches,
        signature,
    })
}

/// Verifies every log file under `dir`; refuses corruption that is not a
/// torn tail of the last file.
pub(crate) fn verify_dir(dir: &Path) -> Result<Report, LogError> {
    let mut report = Report::default();
    let all = list(dir)?;
    let mut buf = Vec::new();
    for queue in [Queue::Append, Queue::Rewrite] {
        let mut files: Vec<&LogFileName> = all.iter().filter(|f| f.queue == queue).collect();
        // Like raft-engine: only the files after the last gap in the
        // sequence are live; older ones are obsolete files kept for reuse.
        if let Some(i) = files.windows(2).rposition(|w| w[1].seq != w[0].seq + 1) {
            report.ignored.extend(files.drain(..=i).map(|f| f.path.clone()));
        }
        let count = files.len();
        for (i, name) in files.into_iter().enumerate() {
            let is_last = i + 1 == count;
            let path = name.path.as_path();
            let f = File::open(path).map_err(|e| io_err("opening", path, e))?;
            let size = f.metadata().map_err(|e| io_err("inspecting", path, e))?.len();
            let walk = walk_file(&f, path, name.seq, size, &mut buf)?;
            report.files += 1;
            report.batches += walk.batches;
            let FileEnd::Broken {
                offset,
                reason,
                entries_end,
            } = walk.end
            else {
                continue;
            };
            if !is_last {
                return Err(LogError::Corrupt {
                    file: path.to_path_buf(),
                    offset,
                    reason,
                });
            }
            // The rewrite queue syncs only every few batches, so its tail
            // may hold any unsynced mix; its content is also still in the
            // append queue until a rewrite is synced.
            // Past a broken batch whose header is plausible, look only
            // after its entries block: that is user data, which may hold
            // anything. Look for the v2 signature too: a version field
            // damaged to read 1 makes the walk expect unsigned batches.
            let probe_from = entries_end.unwrap_or(offset + 1).max(offset + 1);
            let mut signatures = vec![walk.signature];
            if walk.signature != name.seq as u32 {
                signatures.push(name.seq as u32);
            }
            if queue == Queue::Append
                && let Some(next) = find_valid_batch(&f, path, size, probe_from, &signatures, &mut buf)?
            {
                return Err(LogError::Corrupt {
                    file: path.to_path_buf(),
                    offset,
                    reason: format!("{reason}; a valid batch follows at offset {next}, so this is not a torn tail"),
                });
            }
            report.torn.push(TornTail {
                file: path.to_path_buf(),
                offset,
                bytes: size - offset,
                zeroes: all_zero(&f, path, offset, size - offset, &mut buf)?,
            });
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_parsed_like_raft_engine() {
        assert_eq!(parse_name("0000000000000001.raftlog"), Some((Queue::Append, 1)));
        assert_eq!(parse_name("0000000000000012.rewrite"), Some((Queue::Rewrite, 12)));
        assert_eq!(parse_name("0000000000000001.raftlog.reserved"), None);
        assert_eq!(parse_name("LOCK"), None);
        assert_eq!(parse_name("00000000000000é1.raftlog"), None);
        assert_eq!(parse_name("0000000000000001"), None);
    }

    #[test]
    fn implausible_headers_are_refused() {
        let mut h = [0u8; 16];
        assert!(plausible_header(&h, 1000).is_err(), "zeroes are not a batch");
        let len: u64 = 100;
        h[0..8].copy_from_slice(&(len << 8).to_be_bytes());
        h[8..16].copy_from_slice(&16u64.to_be_bytes());
        assert_eq!(plausible_header(&h, 1000), Ok((100, 16)));
        assert!(plausible_header(&h, 99).is_err(), "past the end");
        h[7] = 5;
        assert!(plausible_header(&h, 1000).is_err(), "compression type");
        h[7] = 1;
        assert!(
            plausible_header(&h, 1000).is_err(),
            "lz4: the log never compresses, so a flipped type is damage"
        );
    }
}
