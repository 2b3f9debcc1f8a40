//! Allocation units of a sparse image: which parts of the file are known
//! to hold blocks, so that the first write into a unit can allocate all of
//! it at once (the rest written as zeroes), as dm-thin provisions a whole
//! chunk and zeroes what the write did not cover.
//!
//! Why: a sparse file gets its blocks in the order they are first written.
//! Random 4k writes then leave a volume's blocks scattered over the disk,
//! and every later sequential write of that range goes out as many small
//! device requests (measured: 15 device writes per MiB of 1M writes after a
//! random-write run, against 5.4 on an image allocated in full). Allocating
//! whole units keeps each unit contiguous, at the price of writing the rest
//! of a unit once, the first time it is touched.
//!
//! Safety: a unit is filled only while its bit is clear, and a bit is clear
//! only for a unit that was wholly a hole when the image was opened (or
//! grown) and has not been written since. Bits are set after the write that
//! filled the unit returned and are never cleared (a later hole punch just
//! leaves an allocated unit with a hole in it), so a fill can never land on
//! data: every write into a clear unit goes through [`AllocMap`]'s lock.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use bytes::Bytes;

/// Smallest and largest allocation unit a node may configure.
pub const MIN_UNIT_BYTES: u64 = 64 * 1024;
pub const MAX_UNIT_BYTES: u64 = 4 * 1024 * 1024;

/// Units past this offset are never tracked: ext4's largest file (and
/// Trireme's largest volume) is 16 TiB, so a write there fails anyway, and
/// a wild offset must not grow the map.
const MAX_TRACKED_BYTES: u64 = 16 << 40;

/// Zeroes for the fills: never written, so the pages stay the kernel's
/// shared zero page and cost no memory.
static ZEROES: [u8; MAX_UNIT_BYTES as usize] = [0; MAX_UNIT_BYTES as usize];

/// Checks a configured unit: 0 (off) or a power of two within the bounds.
pub fn validate_unit_bytes(unit_bytes: u64) -> Result<(), String> {
    if unit_bytes == 0 || (unit_bytes.is_power_of_two() && (MIN_UNIT_BYTES..=MAX_UNIT_BYTES).contains(&unit_bytes)) {
        Ok(())
    } else {
        Err(format!(
            "{unit_bytes} is not 0 (off) or a power of two from {MIN_UNIT_BYTES} to {MAX_UNIT_BYTES}"
        ))
    }
}

/// One bit per allocation unit of one image: set = the unit may hold data.
#[derive(Debug)]
pub(crate) struct AllocMap {
    unit_bytes: u64,
    size_bytes: u64,
    words: Vec<u64>,
}

impl AllocMap {
    /// A map of a new, wholly sparse image.
    pub(crate) fn empty(unit_bytes: u64, size_bytes: u64) -> AllocMap {
        let mut m = AllocMap {
            unit_bytes,
            size_bytes: 0,
            words: Vec::new(),
        };
        m.grow(size_bytes);
        m
    }

    /// A map of an existing image: a unit is clear only if the file has no
    /// data anywhere in it (SEEK_DATA / SEEK_HOLE).
    pub(crate) fn scan(file: &File, unit_bytes: u64, size_bytes: u64) -> io::Result<AllocMap> {
        let mut m = AllocMap::empty(unit_bytes, size_bytes);
        let mut at = 0u64;
        while at < size_bytes {
            let Some(data) = seek(file, at, libc::SEEK_DATA)? else {
                break;
            };
            if data >= size_bytes {
                break;
            }
            let hole = seek(file, data, libc::SEEK_HOLE)?.unwrap_or(size_bytes).min(size_bytes);
            m.mark(data, hole.max(data + 1) - data);
            at = hole.max(data + 1);
        }
        Ok(m)
    }

    /// New space past the old end is a hole, except units a write past the
    /// old end already marked: those stay marked.
    pub(crate) fn grow(&mut self, size_bytes: u64) {
        if size_bytes <= self.size_bytes {
            return;
        }
        // The old last unit may have been partial: it stays as it was.
        self.size_bytes = size_bytes;
        let words = size_bytes.div_ceil(self.unit_bytes).div_ceil(64) as usize;
        if self.words.len() < words {
            self.words.resize(words, 0);
        }
    }

    fn is_set(&self, unit: u64) -> bool {
        self.words
            .get((unit / 64) as usize)
            .is_some_and(|w| w & (1 << (unit % 64)) != 0)
    }

    fn units(&self, offset: u64, length: u64) -> std::ops::Range<u64> {
        if length == 0 {
            return 0..0;
        }
        let end = offset.saturating_add(length).min(MAX_TRACKED_BYTES);
        (offset / self.unit_bytes).min(end.div_ceil(self.unit_bytes))..end.div_ceil(self.unit_bytes)
    }

    /// Marks every unit that `[offset, offset + length)` touches, past the
    /// image's end too (a write there extends the file; a later grow must
    /// not take it for a hole).
    pub(crate) fn mark(&mut self, offset: u64, length: u64) {
        for unit in self.units(offset, length) {
            let word = (unit / 64) as usize;
            if word >= self.words.len() {
                self.words.resize(word + 1, 0);
            }
            self.words[word] |= 1 << (unit % 64);
        }
    }

    /// True if the range touches a unit that is still a hole.
    pub(crate) fn touches_clear(&self, offset: u64, length: u64) -> bool {
        self.units(offset, length).any(|u| !self.is_set(u))
    }

    /// The clear units `extents` touch, as runs `(offset, length)` of
    /// adjacent units, clipped to the image. Sorted.
    pub(crate) fn clear_runs(&self, extents: &[(u64, Bytes)]) -> Vec<(u64, u64)> {
        let mut units: Vec<u64> = extents
            .iter()
            .flat_map(|(o, d)| self.units(*o, d.len() as u64))
            .filter(|&u| !self.is_set(u))
            .collect();
        units.sort_unstable();
        units.dedup();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for u in units {
            let start = u * self.unit_bytes;
            if start >= self.size_bytes {
                // Past the end: nothing to allocate ahead of the write.
                continue;
            }
            let end = (start + self.unit_bytes).min(self.size_bytes);
            match runs.last_mut() {
                Some((o, l)) if *o + *l == start => *l = end - *o,
                _ => runs.push((start, end - start)),
            }
        }
        runs
    }

    /// The zero writes that complete the clear units `extents` touch: the
    /// parts of `runs` (their [`AllocMap::clear_runs`]) that no extent
    /// covers. Sorted by offset, disjoint from every extent, none longer
    /// than a unit.
    pub(crate) fn fills(&self, runs: &[(u64, u64)], extents: &[(u64, Bytes)]) -> Vec<(u64, Bytes)> {
        let mut spans: Vec<(u64, u64)> = extents
            .iter()
            .filter(|(_, d)| !d.is_empty())
            .map(|(o, d)| (*o, o.saturating_add(d.len() as u64)))
            .collect();
        spans.sort_unstable();
        let mut out = Vec::new();
        let mut first_span = 0;
        for &(run_start, run_len) in runs {
            let run_end = run_start + run_len;
            // Spans are sorted by start; skip those that end before the run.
            while first_span < spans.len() && spans[first_span].1 <= run_start {
                first_span += 1;
            }
            let mut at = run_start;
            for &(s, e) in &spans[first_span..] {
                if s >= run_end {
                    break;
                }
                if s > at {
                    push_zeroes(&mut out, at, s - at, self.unit_bytes);
                }
                at = at.max(e);
            }
            if at < run_end {
                push_zeroes(&mut out, at, run_end - at, self.unit_bytes);
            }
        }
        out
    }

    /// Marks every unit the extents touch (after they were written).
    pub(crate) fn mark_all(&mut self, extents: &[(u64, Bytes)]) {
        for (o, d) in extents {
            self.mark(*o, d.len() as u64);
        }
    }

    /// Units known to be allocated, and all units, within the image.
    #[cfg(test)]
    pub(crate) fn counts(&self) -> (u64, u64) {
        let total = self.size_bytes.div_ceil(self.unit_bytes);
        let set = (0..total).filter(|&u| self.is_set(u)).count() as u64;
        (set, total)
    }
}

/// True for a buffer [`AllocMap::fills`] made: it points into the shared
/// zeroes. Fills are not worth an early write-back (nobody waits for them).
pub(crate) fn is_fill(data: &Bytes) -> bool {
    let zeroes = ZEROES.as_ptr_range();
    zeroes.contains(&data.as_ptr())
}

/// Zero buffers for `[offset, offset + length)`, each at most a unit (so
/// within [`ZEROES`]).
fn push_zeroes(out: &mut Vec<(u64, Bytes)>, offset: u64, length: u64, unit_bytes: u64) {
    let mut at = offset;
    while at < offset + length {
        let n = (offset + length - at).min(unit_bytes);
        out.push((at, Bytes::from_static(&ZEROES[..n as usize])));
        at += n;
    }
}

/// `lseek` for data or a hole at or after `offset`; None past the last data.
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let at =
        libc::off_t::try_from(offset).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset past off_t"))?;
    // SAFETY: plain syscall on an open descriptor; no memory passed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), at, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(r as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    const UNIT: u64 = MIN_UNIT_BYTES;

    fn data(len: usize) -> Bytes {
        Bytes::from(vec![7u8; len])
    }

    fn fills_of(m: &AllocMap, extents: &[(u64, Bytes)]) -> Vec<(u64, Bytes)> {
        m.fills(&m.clear_runs(extents), extents)
    }

    #[test]
    fn units_are_validated() {
        assert!(validate_unit_bytes(0).is_ok());
        assert!(validate_unit_bytes(1 << 20).is_ok());
        for bad in [4096, 3 << 20, 8 << 20, MIN_UNIT_BYTES + 1] {
            let e = validate_unit_bytes(bad).expect_err("must be refused");
            assert!(e.contains(&bad.to_string()), "{e}");
        }
    }

    #[test]
    fn a_first_write_fills_the_rest_of_its_units() {
        let m = AllocMap::empty(UNIT, 4 * UNIT);
        // 4k in unit 1, and a write straddling units 2 and 3.
        let extents = vec![(UNIT + 4096, data(4096)), (3 * UNIT - 4096, data(8192))];
        let fills = fills_of(&m, &extents);
        // Each fill is at most a unit; merged, they are the gaps.
        let mut gaps: Vec<(u64, u64)> = Vec::new();
        for (o, d) in &fills {
            assert!(d.len() as u64 <= UNIT);
            match gaps.last_mut() {
                Some((s, e)) if *e == *o => *e += d.len() as u64,
                _ => gaps.push((*o, *o + d.len() as u64)),
            }
        }
        assert_eq!(
            gaps,
            vec![
                (UNIT, UNIT + 4096),
                (UNIT + 8192, 3 * UNIT - 4096),
                (3 * UNIT + 4096, 4 * UNIT),
            ]
        );
        assert_eq!(m.clear_runs(&extents), vec![(UNIT, 3 * UNIT)]);
        assert!(fills.iter().all(|(_, d)| d.iter().all(|b| *b == 0)));
    }

    #[test]
    fn set_units_and_covered_units_get_no_fill() {
        let mut m = AllocMap::empty(UNIT, 4 * UNIT);
        m.mark(0, 1);
        assert!(fills_of(&m, &[(4096, data(4096))]).is_empty());
        assert!(fills_of(&m, &[(UNIT, data(UNIT as usize))]).is_empty());
        assert!(m.touches_clear(UNIT, 1));
        assert!(!m.touches_clear(0, UNIT));
    }

    #[test]
    fn the_last_partial_unit_is_filled_only_to_the_end_of_the_image() {
        let m = AllocMap::empty(UNIT, UNIT + 8192);
        let fills = fills_of(&m, &[(UNIT, data(4096))]);
        assert_eq!(fills.len(), 1);
        assert_eq!((fills[0].0, fills[0].1.len() as u64), (UNIT + 4096, 4096));
    }

    #[test]
    fn a_scan_sets_every_unit_holding_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        let mut f = std::fs::File::create(&path).expect("create");
        f.set_len(8 * UNIT).expect("set_len");
        f.write_all_at(&[1u8; 4096], 3 * UNIT + 8192).expect("write");
        f.write_all_at(&[1u8; 4096], 8 * UNIT - 4096).expect("write");
        f.flush().expect("flush");
        let m = AllocMap::scan(&f, UNIT, 8 * UNIT).expect("scan");
        let set: Vec<u64> = (0..8).filter(|&u| m.is_set(u)).collect();
        assert_eq!(set, vec![3, 7]);
        assert_eq!(m.counts(), (2, 8));
    }

    #[test]
    fn a_write_past_the_end_stays_marked_when_the_image_grows_over_it() {
        let mut m = AllocMap::empty(UNIT, UNIT);
        let past = vec![(3 * UNIT + 4096, data(4096))];
        assert!(fills_of(&m, &past).is_empty(), "nothing is filled past the end");
        m.mark_all(&past);
        m.grow(4 * UNIT);
        assert!(!m.touches_clear(3 * UNIT, UNIT), "the written unit stays marked");
        assert!(m.touches_clear(2 * UNIT, 1));
        assert_eq!(m.counts(), (1, 4));
        // A wild offset is neither filled nor tracked.
        let wild = vec![(u64::MAX - 4095, data(4096))];
        assert!(fills_of(&m, &wild).is_empty());
        m.mark_all(&wild);
        assert_eq!(m.words.len(), 1);
    }

    #[test]
    fn growing_adds_clear_units() {
        let mut m = AllocMap::empty(UNIT, UNIT);
        m.mark(0, UNIT);
        m.grow(3 * UNIT);
        assert_eq!(m.counts(), (1, 3));
        assert!(m.touches_clear(UNIT, 1));
    }
}
