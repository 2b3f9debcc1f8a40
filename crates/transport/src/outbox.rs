//! A link's outbox: the encoded frames not yet written to its socket, in
//! order. Small messages and frame headers are copied into one growing
//! buffer; an entry payload of [`SHARE_MIN_BYTES`] or more is kept by
//! reference (the `Bytes` the Raft log holds anyway) and handed to the
//! kernel from there with a vectored write, so a 1 MiB append sent to two
//! followers costs the leader no copy of its payload in user space.

use std::collections::VecDeque;
use std::io::{IoSlice, Write};

use bytes::{Buf, Bytes};
use protobuf::Message as _;

use crate::TransportError;
use crate::wire;

/// Payloads at least this large are sent from where they are; smaller ones
/// are cheaper to copy than to track. (rust-protobuf hands a payload to the
/// writer whole only past its own 8 KiB buffer anyway.)
pub(crate) const SHARE_MIN_BYTES: usize = 64 * 1024;
/// An emptied copy buffer larger than this is let go, so one burst does
/// not pin its memory for the life of the link.
const KEEP_BUFFER_BYTES: usize = 4 << 20;
/// Slices handed to one vectored write, at most.
const MAX_SLICES: usize = 64;

/// The bytes of a link not yet written: `segments` (front to back), then
/// `tail[tail_sent..]`.
#[derive(Default)]
pub(crate) struct Outbox {
    /// Whole pieces queued ahead of `tail`: frozen parts of earlier tails,
    /// and shared payloads.
    segments: VecDeque<Bytes>,
    /// Where encoded bytes are appended.
    tail: Vec<u8>,
    /// How much of `tail` was written (only ever non-zero while `segments`
    /// is empty).
    tail_sent: usize,
    /// Unsent bytes in all.
    unsent: usize,
    /// Where each queued message ends, counted in bytes ever queued, so
    /// the link's message bound counts what is still waiting.
    message_ends: VecDeque<u64>,
    queued_total: u64,
    sent_total: u64,
}

impl Outbox {
    pub(crate) fn is_empty(&self) -> bool {
        self.unsent == 0
    }

    /// Bytes held in memory: unsent ones and the written part of `tail`
    /// that is not let go yet. What the link's byte bound counts.
    pub(crate) fn held_bytes(&self) -> usize {
        self.unsent + self.tail_sent
    }

    /// Messages queued and not wholly written.
    pub(crate) fn messages(&self) -> usize {
        self.message_ends.len()
    }

    /// Appends bytes that are copied.
    pub(crate) fn extend(&mut self, bytes: &[u8]) {
        self.tail.extend_from_slice(bytes);
        self.unsent += bytes.len();
        self.queued_total += bytes.len() as u64;
    }

    /// Appends encoded messages, copied, counted as one (frames an
    /// injected delay held back).
    #[cfg(feature = "faults")]
    pub(crate) fn extend_message(&mut self, bytes: &[u8]) {
        self.extend(bytes);
        self.message_ends.push_back(self.queued_total);
    }

    /// Appends a payload by reference, after everything queued.
    fn share(&mut self, payload: &Bytes) {
        self.freeze_tail();
        self.unsent += payload.len();
        self.queued_total += payload.len() as u64;
        self.segments.push_back(payload.clone());
    }

    /// Moves the unsent part of `tail` into `segments`, without a copy.
    fn freeze_tail(&mut self) {
        if self.tail.len() > self.tail_sent {
            let mut frozen = Bytes::from(std::mem::take(&mut self.tail));
            frozen.advance(self.tail_sent);
            self.segments.push_back(frozen);
        } else {
            self.tail.clear();
        }
        self.tail_sent = 0;
    }

    /// Appends a RAFT frame. `size` is `message.compute_size()` (which also
    /// cached the sizes the encoder writes with). On an error the outbox
    /// may hold part of the frame: the caller must end the link, which
    /// clears it.
    pub(crate) fn push_raft(
        &mut self,
        group_id: u64,
        message: &raft::eraftpb::Message,
        size: usize,
    ) -> Result<(), TransportError> {
        let large: Vec<&Bytes> = message
            .entries
            .iter()
            .map(|e| &e.data)
            .filter(|d| d.len() >= SHARE_MIN_BYTES)
            .collect();
        if large.is_empty() {
            let before = self.tail.len();
            wire::encode_raft(&mut self.tail, group_id, message, size)?;
            let added = self.tail.len() - before;
            self.unsent += added;
            self.queued_total += added as u64;
            self.message_ends.push_back(self.queued_total);
            return Ok(());
        }
        let mut header = Vec::with_capacity(wire::FRAME_HEADER_BYTES + wire::GROUP_ID_BYTES);
        wire::encode_raft_header(&mut header, group_id, size)?;
        self.extend(&header);
        let mut sink = SharingWriter {
            outbox: self,
            large: &large,
            written: 0,
        };
        let mut out = protobuf::CodedOutputStream::new(&mut sink);
        message
            .write_to_with_cached_sizes(&mut out)
            .and_then(|()| out.flush())
            .map_err(|e| TransportError::Protocol(format!("encoding a raft message: {e}")))?;
        drop(out);
        if sink.written != size {
            return Err(TransportError::Protocol(format!(
                "raft message encoded to {} bytes, not the {size} computed",
                sink.written
            )));
        }
        self.message_ends.push_back(self.queued_total);
        Ok(())
    }

    /// The unsent bytes as slices for one vectored write, in order.
    pub(crate) fn slices(&self) -> Vec<IoSlice<'_>> {
        let mut out = Vec::with_capacity(self.segments.len().min(MAX_SLICES) + 1);
        for s in self.segments.iter().take(MAX_SLICES) {
            out.push(IoSlice::new(s));
        }
        if out.len() < MAX_SLICES && self.tail.len() > self.tail_sent {
            out.push(IoSlice::new(&self.tail[self.tail_sent..]));
        }
        out
    }

    /// Drops the first `n` unsent bytes: they were written.
    pub(crate) fn advance(&mut self, mut n: usize) {
        debug_assert!(n <= self.unsent);
        self.unsent -= n.min(self.unsent);
        self.sent_total += n as u64;
        while self.message_ends.front().is_some_and(|&end| end <= self.sent_total) {
            self.message_ends.pop_front();
        }
        while n > 0 {
            let Some(front) = self.segments.front_mut() else {
                break;
            };
            if n < front.len() {
                front.advance(n);
                return;
            }
            n -= front.len();
            self.segments.pop_front();
        }
        self.tail_sent += n;
        if self.unsent == 0 {
            self.tail.clear();
            self.tail_sent = 0;
            if self.tail.capacity() > KEEP_BUFFER_BYTES {
                self.tail = Vec::new();
            }
        } else if self.segments.is_empty()
            && self.tail_sent >= KEEP_BUFFER_BYTES
            && self.tail_sent * 2 >= self.tail.len()
        {
            // A link that never drains (a slow peer, steady senders) would
            // keep its written bytes forever: move the rest to the front.
            self.tail.drain(..self.tail_sent);
            self.tail_sent = 0;
        }
    }

    pub(crate) fn clear(&mut self) {
        *self = Outbox::default();
    }
}

/// Where rust-protobuf writes a message with large payloads: its buffered
/// output is copied, and a write that is exactly one of the large payloads
/// (the encoder hands those over whole, unbuffered) is queued by reference.
struct SharingWriter<'a> {
    outbox: &'a mut Outbox,
    large: &'a [&'a Bytes],
    written: usize,
}

impl Write for SharingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.written += buf.len();
        let shared = self
            .large
            .iter()
            .find(|p| p.len() == buf.len() && p.as_ptr() == buf.as_ptr());
        match shared {
            Some(payload) => self.outbox.share(payload),
            None => self.outbox.extend(buf),
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use proptest::prelude::*;
    use raft::eraftpb::Message;

    use super::*;
    use crate::wire::test_messages::append;
    use crate::wire::{Frame, FrameLimits, decode_frame, parse_message};

    /// One write of at most `chunk` bytes, as a socket that takes that
    /// much would do it.
    fn write_some(outbox: &mut Outbox, chunk: usize, wire: &mut Vec<u8>) {
        let mut left = chunk;
        let mut took = 0;
        for s in outbox.slices() {
            let n = s.len().min(left);
            wire.extend_from_slice(&s[..n]);
            took += n;
            left -= n;
            if left == 0 {
                break;
            }
        }
        outbox.advance(took);
    }

    /// Writes the outbox out in pieces of at most `chunk` bytes.
    fn drain(outbox: &mut Outbox, chunk: usize) -> Vec<u8> {
        let mut wire = Vec::new();
        while !outbox.is_empty() {
            write_some(outbox, chunk, &mut wire);
        }
        wire
    }

    fn frames(wire: &[u8]) -> Vec<(u64, Message)> {
        let mut buf = BytesMut::from(wire);
        let mut out = Vec::new();
        let limits = FrameLimits {
            raft_message_bytes: Some(64 << 20),
        };
        while let Some(f) = decode_frame(&mut buf, limits).unwrap() {
            let Frame::Raft { group_id, message } = f else {
                panic!("not a raft frame")
            };
            out.push((group_id, parse_message(&message).unwrap()));
        }
        assert!(buf.is_empty(), "bytes left over");
        out
    }

    #[test]
    fn large_payloads_are_sent_from_where_they_are() {
        let m = append(&[SHARE_MIN_BYTES, 100, 1 << 20]);
        let size = m.compute_size() as usize;
        let mut outbox = Outbox::default();
        outbox.push_raft(7, &m, size).unwrap();
        let payloads: Vec<usize> = [0, 2].iter().map(|&i| m.entries[i].data.as_ptr() as usize).collect();
        let shared = outbox
            .segments
            .iter()
            .filter(|s| payloads.contains(&(s.as_ptr() as usize)))
            .count();
        assert_eq!(shared, 2, "both large payloads are referenced, not copied");
        assert!(outbox.tail.len() + outbox.segments.iter().map(|s| s.len()).sum::<usize>() < size + 200);
        assert_eq!(outbox.messages(), 1);
        let wire = drain(&mut outbox, 1 << 30);
        assert_eq!(frames(&wire), vec![(7, m)]);
        assert_eq!(outbox.messages(), 0);
    }

    #[test]
    fn messages_count_until_their_last_byte_is_written() {
        let small = append(&[10]);
        let size = small.compute_size() as usize;
        let mut outbox = Outbox::default();
        for g in 0..3 {
            outbox.push_raft(g, &small, size).unwrap();
        }
        outbox.extend(&[0, 0, 0, 0, wire::kind::PING]);
        assert_eq!(outbox.messages(), 3, "a PING is not a message");
        let frame = wire::FRAME_HEADER_BYTES + wire::GROUP_ID_BYTES + size;
        outbox.advance(frame - 1);
        assert_eq!(outbox.messages(), 3);
        outbox.advance(1);
        assert_eq!(outbox.messages(), 2);
        outbox.advance(frame + 1);
        assert_eq!(outbox.messages(), 1);
    }

    #[test]
    fn a_link_that_never_drains_lets_go_of_what_it_wrote() {
        let mut outbox = Outbox::default();
        outbox.extend(&vec![1u8; 3 * KEEP_BUFFER_BYTES]);
        outbox.advance(2 * KEEP_BUFFER_BYTES);
        assert_eq!(outbox.held_bytes(), KEEP_BUFFER_BYTES);
        outbox.extend(&[2u8; 10]);
        let wire = drain(&mut outbox, 4096);
        assert_eq!(wire.len(), KEEP_BUFFER_BYTES + 10);
        assert!(wire[..KEEP_BUFFER_BYTES].iter().all(|&b| b == 1));
        assert_eq!(outbox.held_bytes(), 0);
    }

    proptest! {
        /// Whatever mix of messages is queued, and however the socket takes
        /// the bytes, the frames come out whole, in order, and equal.
        #[test]
        fn frames_come_out_in_order_at_any_write_size(
            messages in proptest::collection::vec(proptest::collection::vec(
                prop_oneof![0usize..300, (SHARE_MIN_BYTES - 10)..(SHARE_MIN_BYTES + 3000)], 0..4), 1..6),
            chunk in prop_oneof![1usize..64, 1000usize..100_000],
            drain_between in any::<bool>(),
        ) {
            let mut outbox = Outbox::default();
            let mut wire = Vec::new();
            let mut sent = Vec::new();
            for (i, payloads) in messages.iter().enumerate() {
                let m = append(payloads);
                let size = m.compute_size() as usize;
                outbox.push_raft(i as u64, &m, size).unwrap();
                if i % 2 == 0 {
                    outbox.extend(&[0, 0, 0, 0, wire::kind::PING]);
                }
                sent.push((i as u64, m));
                if drain_between {
                    // Part of what is queued goes out before the next message.
                    write_some(&mut outbox, chunk, &mut wire);
                }
            }
            wire.extend(drain(&mut outbox, chunk));
            let mut buf = BytesMut::from(&wire[..]);
            let limits = FrameLimits { raft_message_bytes: Some(64 << 20) };
            let mut got = Vec::new();
            while let Some(f) = decode_frame(&mut buf, limits).unwrap() {
                if let Frame::Raft { group_id, message } = f {
                    got.push((group_id, parse_message(&message).unwrap()));
                }
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(got, sent);
            prop_assert_eq!(outbox.held_bytes(), 0);
        }
    }
}
