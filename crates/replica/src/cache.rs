//! The write-back cache: committed writes not yet destaged to the image,
//! as non-overlapping extents, each tagged with the log index that wrote
//! it. Reads overlay the cache on the image; the destager writes extents
//! out and then drops those at or below the index it made durable. The
//! cache is bounded in bytes: a full cache is backpressure for proposals.

use std::collections::BTreeMap;

use bytes::Bytes;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtentData {
    Data(Bytes),
    Zero,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    pub data: ExtentData,
    /// Raft index of the entry that wrote this extent.
    pub index: u64,
}

impl Extent {
    /// The part of this extent from `skip` bytes in, `length` long.
    fn slice(&self, skip: u64, length: u64) -> Extent {
        let data = match &self.data {
            ExtentData::Data(b) => ExtentData::Data(b.slice(skip as usize..(skip + length) as usize)),
            ExtentData::Zero => ExtentData::Zero,
        };
        Extent {
            length,
            data,
            index: self.index,
        }
    }

    fn cost_bytes(&self) -> u64 {
        match self.data {
            ExtentData::Data(_) => self.length,
            ExtentData::Zero => 0,
        }
    }
}

/// Where each part of a read comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Cached {
        offset: u64,
        data: Bytes,
    },
    Zero {
        offset: u64,
        length: u64,
    },
    /// Not in the cache: read it from the image.
    Image {
        offset: u64,
        length: u64,
    },
}

#[derive(Debug, Default)]
pub struct WriteCache {
    extents: BTreeMap<u64, Extent>,
    bytes: u64,
}

impl WriteCache {
    pub fn new() -> WriteCache {
        WriteCache::default()
    }

    /// Data bytes held (zeroed ranges cost nothing).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn extent_count(&self) -> usize {
        self.extents.len()
    }

    fn remove_range(&mut self, offset: u64, end: u64) {
        let overlapping: Vec<u64> = self
            .extents
            .range(..end)
            .rev()
            .take_while(|(start, e)| *start + e.length > offset)
            .map(|(start, _)| *start)
            .collect();
        for start in overlapping {
            let Some(e) = self.extents.remove(&start) else { continue };
            self.bytes -= e.cost_bytes();
            let e_end = start + e.length;
            if start < offset {
                let left = e.slice(0, offset - start);
                self.bytes += left.cost_bytes();
                self.extents.insert(start, left);
            }
            if e_end > end {
                let right = e.slice(end - start, e_end - end);
                self.bytes += right.cost_bytes();
                self.extents.insert(end, right);
            }
        }
    }

    /// Records a committed write (or zeroing) over whatever was cached.
    pub fn insert(&mut self, offset: u64, length: u64, data: ExtentData, index: u64) {
        if length == 0 {
            return;
        }
        if let ExtentData::Data(b) = &data {
            assert_eq!(b.len() as u64, length, "extent data length must match its length");
        }
        let end = offset.checked_add(length).expect("extent range overflows");
        self.remove_range(offset, end);
        let e = Extent { length, data, index };
        self.bytes += e.cost_bytes();
        self.extents.insert(offset, e);
    }

    /// The parts of `[offset, offset+length)`, in order, covering it exactly.
    pub fn read(&self, offset: u64, length: u64) -> Vec<Segment> {
        let end = offset + length;
        let mut out = Vec::new();
        let mut pos = offset;
        // The extent that starts before `offset` may still cover it.
        let first = self
            .extents
            .range(..=offset)
            .next_back()
            .map(|(s, _)| *s)
            .unwrap_or(offset);
        for (&start, e) in self.extents.range(first..end) {
            let e_end = start + e.length;
            if e_end <= pos {
                continue;
            }
            if start > pos {
                out.push(Segment::Image {
                    offset: pos,
                    length: start - pos,
                });
                pos = start;
            }
            let take_end = e_end.min(end);
            let part = e.slice(pos - start, take_end - pos);
            out.push(match part.data {
                ExtentData::Data(data) => Segment::Cached { offset: pos, data },
                ExtentData::Zero => Segment::Zero {
                    offset: pos,
                    length: part.length,
                },
            });
            pos = take_end;
        }
        if pos < end {
            out.push(Segment::Image {
                offset: pos,
                length: end - pos,
            });
        }
        out
    }

    /// Extents written at or below `index`, to destage.
    pub fn dirty_up_to(&self, index: u64) -> Vec<(u64, Extent)> {
        self.extents
            .iter()
            .filter(|(_, e)| e.index <= index)
            .map(|(s, e)| (*s, e.clone()))
            .collect()
    }

    /// Drops extents at or below `index` once the image holds them durably;
    /// later overwrites (higher index) stay.
    pub fn mark_destaged(&mut self, index: u64) {
        let mut freed = 0;
        self.extents.retain(|_, e| {
            let keep = e.index > index;
            if !keep {
                freed += e.cost_bytes();
            }
            keep
        });
        self.bytes -= freed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Resolves segments against an "image" of zeroes into bytes.
    fn materialise(segments: &[Segment], image: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for s in segments {
            match s {
                Segment::Cached { data, .. } => out.extend_from_slice(data),
                Segment::Zero { length, .. } => out.extend(std::iter::repeat_n(0u8, *length as usize)),
                Segment::Image { offset, length } => {
                    out.extend_from_slice(&image[*offset as usize..(*offset + *length) as usize])
                }
            }
        }
        out
    }

    #[test]
    fn an_overwrite_in_the_middle_splits_the_extent() {
        let mut c = WriteCache::new();
        c.insert(0, 12, ExtentData::Data(Bytes::from_static(b"aaaaaaaaaaaa")), 1);
        c.insert(4, 4, ExtentData::Data(Bytes::from_static(b"bbbb")), 2);
        assert_eq!(c.extent_count(), 3);
        assert_eq!(c.bytes(), 12);
        assert_eq!(materialise(&c.read(0, 12), &[0; 12]), b"aaaabbbbaaaa");
        c.mark_destaged(1);
        assert_eq!(c.bytes(), 4);
        let image = b"IIIIIIIIIIII";
        assert_eq!(materialise(&c.read(0, 12), image), b"IIIIbbbbIIII");
    }

    proptest! {
        // The cache over an image behaves like a flat array (redb-style model check).
        #[test]
        fn cache_over_image_matches_a_flat_model(
            ops in proptest::collection::vec((0u64..200, 1u64..60, any::<u8>(), any::<bool>()), 1..50),
            destage_at in 0u64..60,
        ) {
            let mut model = vec![7u8; 300];
            let mut image = vec![7u8; 300];
            let mut c = WriteCache::new();
            for (i, (off, len, byte, zero)) in ops.iter().enumerate() {
                let index = i as u64 + 1;
                if *zero {
                    c.insert(*off, *len, ExtentData::Zero, index);
                    model[*off as usize..(*off + *len) as usize].fill(0);
                } else {
                    c.insert(*off, *len, ExtentData::Data(Bytes::from(vec![*byte; *len as usize])), index);
                    model[*off as usize..(*off + *len) as usize].fill(*byte);
                }
                if index == destage_at {
                    // Destage: write what the cache holds up to here, then forget it.
                    for (start, e) in c.dirty_up_to(index) {
                        let r = start as usize..(start + e.length) as usize;
                        match e.data {
                            ExtentData::Data(d) => image[r].copy_from_slice(&d),
                            ExtentData::Zero => image[r].fill(0),
                        }
                    }
                    c.mark_destaged(index);
                }
            }
            prop_assert_eq!(materialise(&c.read(0, 300), &image), model.clone());
            prop_assert_eq!(materialise(&c.read(37, 101), &image), model[37..138].to_vec());
            let held: u64 = c.dirty_up_to(u64::MAX).iter().map(|(_, e)| e.cost_bytes()).sum();
            prop_assert_eq!(held, c.bytes());
        }
    }
}
