//! The writer raft-engine appends log files through: raft-engine's own
//! (`pwrite` at an offset it tracks), except that an append ending inside
//! the file is padded with zeroes to the end of its last page, in the same
//! `pwritev`.
//!
//! Why: appends overwrite a file written before (zero-filled when made, or
//! recycled), and a write that covers only part of a page whose old bytes
//! are not in the page cache makes the kernel read that page from disk first,
//! synchronously, on the path of every Raft write. The pages ahead of the
//! append point are touched by nothing until the append reaches them, so the
//! kernel may reclaim them as cold: on this machine DAMON's page-out does,
//! within seconds, and a 4 KiB append then took about 145 us instead of a few.
//! A write that ends on a page boundary needs no read; the next append
//! overwrites the padding.
//!
//! Why that is safe: everything past raft-engine's write offset is junk to it
//! (old records of a recycled file, or zeroes); recovery stops at the first
//! batch that does not check out, and `verify.rs` treats zeroes after the
//! last batch as preallocated space. Padding never grows the file: it stops
//! at the size the file has, so a clean close still truncates to the last
//! record.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use raft_engine::env::{DefaultFileSystem, FileSystem, Handle, WriteExt};

type InnerHandle = <DefaultFileSystem as FileSystem>::Handle;

const PAGE_BYTES: usize = 4096;
static ZEROES: [u8; PAGE_BYTES] = [0; PAGE_BYTES];

pub(crate) struct PaddedWriter {
    /// raft-engine's descriptor: truncate, allocate and size go through it.
    handle: Arc<InnerHandle>,
    /// Our own descriptor of the same file, for `pwritev` (raft-engine's
    /// does not expose its raw descriptor).
    file: File,
    offset: usize,
    /// The file's size: padding stops here.
    size: usize,
    /// Off for files other than the append queue's.
    pad: bool,
}

impl PaddedWriter {
    pub(crate) fn new(handle: Arc<InnerHandle>, file: File, pad: bool) -> io::Result<PaddedWriter> {
        let size = handle.file_size()?;
        Ok(PaddedWriter {
            handle,
            file,
            offset: 0,
            size,
            pad,
        })
    }

    /// Zeroes to write after `len` bytes at the current offset.
    fn padding(&self, len: usize) -> usize {
        let end = self.offset + len;
        if !self.pad || end >= self.size {
            return 0;
        }
        ((PAGE_BYTES - end % PAGE_BYTES) % PAGE_BYTES).min(self.size - end)
    }
}

impl Write for PaddedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let at = self.offset as u64;
        let pad = self.padding(buf.len());
        let written = if pad == 0 {
            self.file.write_at(buf, at)?
        } else {
            let iov = [io::IoSlice::new(buf), io::IoSlice::new(&ZEROES[..pad])];
            nix::sys::uio::pwritev(&self.file, &iov, at as i64).map_err(io::Error::from)?
        };
        // The padding is ours: raft-engine sees only its own bytes.
        let written = written.min(buf.len());
        self.offset += written;
        self.size = self.size.max(self.offset);
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for PaddedWriter {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let target = match pos {
            SeekFrom::Start(at) => Some(at),
            SeekFrom::Current(delta) => (self.offset as u64).checked_add_signed(delta),
            SeekFrom::End(delta) => (self.handle.file_size()? as u64).checked_add_signed(delta),
        };
        let target =
            target.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start of a log file"))?;
        self.offset = usize::try_from(target).map_err(io::Error::other)?;
        Ok(target)
    }
}

impl WriteExt for PaddedWriter {
    fn truncate(&mut self, offset: usize) -> io::Result<()> {
        self.handle.truncate(offset)?;
        self.offset = offset;
        self.size = offset;
        Ok(())
    }

    fn allocate(&mut self, offset: usize, size: usize) -> io::Result<()> {
        self.handle.allocate(offset, size)?;
        // Where fallocate is not supported the call succeeds without
        // growing the file: ask rather than assume.
        self.size = self.handle.file_size()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(dir: &tempfile::TempDir, size: usize, pad: bool) -> (PaddedWriter, std::path::PathBuf) {
        let path = dir.path().join("f.raftlog");
        std::fs::write(&path, vec![0xAAu8; size]).unwrap();
        let handle = Arc::new(InnerHandle::open(&path, raft_engine::env::Permission::ReadWrite).unwrap());
        let file = File::options().write(true).open(&path).unwrap();
        (PaddedWriter::new(handle, file, pad).unwrap(), path)
    }

    #[test]
    fn appends_inside_the_file_are_padded_to_the_page_and_the_file_keeps_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, path) = writer(&dir, 3 * PAGE_BYTES, true);
        w.write_all(&[1u8; 100]).unwrap();
        w.write_all(&[2u8; 5000]).unwrap();
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len(), 3 * PAGE_BYTES, "padding must not grow the file");
        assert!(data[..100].iter().all(|&b| b == 1));
        assert!(data[100..5100].iter().all(|&b| b == 2));
        // The second append's page is zero-padded; the page after is untouched.
        assert!(data[5100..2 * PAGE_BYTES].iter().all(|&b| b == 0));
        assert!(data[2 * PAGE_BYTES..].iter().all(|&b| b == 0xAA));
        assert_eq!(w.offset, 5100, "the offset counts raft-engine's bytes only");
    }

    #[test]
    fn appends_at_the_end_of_the_file_are_not_padded() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, path) = writer(&dir, 100, true);
        w.seek(SeekFrom::End(0)).unwrap();
        w.write_all(&[3u8; 10]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap().len(), 110);
        // Past a truncate, the same.
        w.truncate(50).unwrap();
        w.write_all(&[4u8; 10]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap().len(), 60);
    }

    #[test]
    fn writers_of_other_files_do_not_pad() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, path) = writer(&dir, 2 * PAGE_BYTES, false);
        w.write_all(&[5u8; 10]).unwrap();
        let data = std::fs::read(&path).unwrap();
        assert!(data[10..].iter().all(|&b| b == 0xAA));
    }
}
