//! The Raft link's wire format: a length-prefixed stream over plain TCP,
//! one connection per ordered node pair, on the same peer listener as the
//! gRPC calls (a connection that opens with [`MAGIC`] is a Raft link; any
//! other is handed to gRPC).
//!
//! Why not a gRPC stream: every Raft message crossed about seven threads or
//! tasks on its way (group task, sender task, hyper's body pipe, the h2
//! connection task, then on the receiver its h2 connection task and the
//! stream handler before the group task), and on this kind of machine a
//! wake-up of a parked thread costs tens of microseconds. Here the sender
//! writes to the socket itself, and the receiver's reader hands each
//! message to its group.
//!
//! ```text
//! sender -> receiver, once:  hello
//!   magic      8 bytes  "TRIRAFT1" (protocol version 1)
//!   node_id    u64 LE   the sender (must be a configured peer)
//!   cluster    u16 LE length, then that many bytes (the cluster id)
//!   secret     u16 LE length, then that many bytes (the cluster secret)
//! receiver -> sender, once:  an ACCEPT frame, or a REFUSE frame and close
//! then, both ways:  frames
//!   length     u32 LE   bytes of the body that follows the kind byte
//!   kind       u8
//!   body       RAFT   (sender -> receiver): group_id u64 LE, then one
//!                     raft-rs eraftpb.Message (rust-protobuf 2 encoding)
//!              PING   (both ways, empty): sent by a side that wrote
//!                     nothing for a keepalive interval
//!              ACCEPT (receiver -> sender, empty)
//!              REFUSE (receiver -> sender): the reason, UTF-8
//! ```
//!
//! Bounds: a hello field is at most [`MAX_HELLO_FIELD_BYTES`]; a RAFT body
//! at most the receiver's message limit plus the group id; a REFUSE reason
//! at most [`MAX_REASON_BYTES`]. A frame over its bound, an unknown kind,
//! or a kind the direction does not carry closes the connection before its
//! body is read. A RAFT message that does not parse, or whose `from` is not
//! the sender or whose `to` is not the receiver, is dropped alone.
//!
//! One type raft-rs never sends between nodes carries Trireme's own
//! meaning: in a quorum-receipt volume, a follower answers each append it
//! accepted with a `MsgUnreachable` whose `term` and `index` say "my log
//! holds yours up to `index`, in `term`", before that entry is durable. The
//! leader counts receipts to acknowledge writes; it never steps them into
//! Raft.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use protobuf::Message as _;

use crate::TransportError;

/// Opens every Raft link; the last byte is the protocol version.
pub const MAGIC: [u8; 8] = *b"TRIRAFT1";
/// Bound of the hello's cluster id and secret, each.
pub const MAX_HELLO_FIELD_BYTES: usize = 4096;
/// Bound of a REFUSE frame's reason.
pub const MAX_REASON_BYTES: usize = 1024;
/// Length and kind.
pub const FRAME_HEADER_BYTES: usize = 5;
/// A RAFT body's group id.
pub const GROUP_ID_BYTES: usize = 8;

/// Frame kinds.
pub mod kind {
    pub const RAFT: u8 = 1;
    pub const PING: u8 = 2;
    pub const ACCEPT: u8 = 3;
    pub const REFUSE: u8 = 4;
}

/// What a sender presents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub node_id: u64,
    pub cluster_id: Vec<u8>,
    pub secret: Vec<u8>,
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A raft message, still encoded: it is parsed (and may be dropped)
    /// by the receiver, which knows the sender.
    Raft {
        group_id: u64,
        message: Bytes,
    },
    Ping,
    Accept,
    Refuse(String),
}

fn protocol(why: String) -> TransportError {
    TransportError::Protocol(why)
}

/// Appends the hello. Fields over [`MAX_HELLO_FIELD_BYTES`] are refused
/// (config validation keeps them shorter).
pub fn encode_hello(buf: &mut Vec<u8>, hello: &Hello) -> Result<(), TransportError> {
    buf.put_slice(&MAGIC);
    buf.put_u64_le(hello.node_id);
    for (field, value) in [("cluster_id", &hello.cluster_id), ("secret", &hello.secret)] {
        if value.len() > MAX_HELLO_FIELD_BYTES {
            return Err(protocol(format!(
                "{field} of {} bytes exceeds the hello's limit of {MAX_HELLO_FIELD_BYTES}",
                value.len()
            )));
        }
        buf.put_u16_le(value.len() as u16);
        buf.put_slice(value);
    }
    Ok(())
}

/// Takes a whole hello from the front of `buf`: `Ok(None)` until it has
/// arrived, an error naming the problem for anything that is not one.
pub fn decode_hello(buf: &mut BytesMut) -> Result<Option<Hello>, TransportError> {
    let have = buf.len().min(MAGIC.len());
    if buf[..have] != MAGIC[..have] {
        return Err(protocol("the connection does not open with the Raft link magic".into()));
    }
    let mut at = MAGIC.len() + 8;
    let mut fields = [0usize; 2];
    for (i, name) in ["cluster_id", "secret"].into_iter().enumerate() {
        let Some(len) = buf.get(at..at + 2) else {
            return Ok(None);
        };
        let len = usize::from(u16::from_le_bytes([len[0], len[1]]));
        if len > MAX_HELLO_FIELD_BYTES {
            return Err(protocol(format!(
                "hello {name} of {len} bytes exceeds the limit of {MAX_HELLO_FIELD_BYTES}"
            )));
        }
        fields[i] = len;
        at += 2 + len;
    }
    if buf.len() < at {
        return Ok(None);
    }
    buf.advance(MAGIC.len());
    let node_id = buf.get_u64_le();
    let mut take = |len: usize| {
        buf.advance(2);
        buf.split_to(len).to_vec()
    };
    let cluster_id = take(fields[0]);
    let secret = take(fields[1]);
    Ok(Some(Hello {
        node_id,
        cluster_id,
        secret,
    }))
}

/// Appends a RAFT frame. `size` is `message.compute_size()`, which also
/// caches the sizes that `write_to_with_cached_sizes` writes with; the
/// entries' payloads are copied once, into `buf`, with no buffer of the
/// encoder's own in between.
pub fn encode_raft(
    buf: &mut Vec<u8>,
    group_id: u64,
    message: &raft::eraftpb::Message,
    size: usize,
) -> Result<(), TransportError> {
    let frame_start = buf.len();
    // One more byte than the frame: the encoder's final flush reserves one,
    // which must not reallocate (and copy) the whole buffer.
    buf.reserve(FRAME_HEADER_BYTES + GROUP_ID_BYTES + size + 1);
    encode_raft_header(buf, group_id, size)?;
    let start = buf.len();
    let mut out = protobuf::CodedOutputStream::vec(buf);
    let written = message
        .write_to_with_cached_sizes(&mut out)
        .and_then(|()| out.flush())
        .map_err(|e| protocol(format!("encoding a raft message: {e}")));
    drop(out);
    let wrote = buf.len() - start;
    let checked = written.and_then(|()| {
        // Stale cached sizes would give a frame whose length is wrong, and
        // desynchronise the stream.
        if wrote == size {
            Ok(())
        } else {
            Err(protocol(format!(
                "raft message encoded to {wrote} bytes, not the {size} computed"
            )))
        }
    });
    if checked.is_err() {
        buf.truncate(frame_start);
    }
    checked
}

/// Appends the header of a RAFT frame whose message is `size` bytes.
pub fn encode_raft_header(buf: &mut Vec<u8>, group_id: u64, size: usize) -> Result<(), TransportError> {
    let len = u32::try_from(GROUP_ID_BYTES + size)
        .map_err(|_| protocol(format!("a raft message of {size} bytes does not fit a frame")))?;
    buf.put_u32_le(len);
    buf.put_u8(kind::RAFT);
    buf.put_u64_le(group_id);
    Ok(())
}

/// Appends an empty frame of `kind` (PING, ACCEPT).
pub fn encode_empty(buf: &mut Vec<u8>, kind: u8) {
    buf.put_u32_le(0);
    buf.put_u8(kind);
}

/// Appends a REFUSE frame, its reason cut to [`MAX_REASON_BYTES`] on a
/// character boundary.
pub fn encode_refuse(buf: &mut Vec<u8>, reason: &str) {
    let mut end = reason.len().min(MAX_REASON_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    buf.put_u32_le(end as u32);
    buf.put_u8(kind::REFUSE);
    buf.put_slice(&reason.as_bytes()[..end]);
}

/// Which frames a side accepts, and how large a RAFT body may be.
#[derive(Debug, Clone, Copy)]
pub struct FrameLimits {
    /// RAFT frames are accepted (the receiver of a link), with messages up
    /// to this many bytes; `None`: the sender's side, which takes only
    /// PING, ACCEPT and REFUSE.
    pub raft_message_bytes: Option<usize>,
}

/// The body length a frame needs before it can be decoded, once its
/// header is in `buf`: lets a reader reserve room for a large body, so it
/// is read in place. Checks the header first.
pub fn pending_body(buf: &[u8], limits: FrameLimits) -> Result<Option<usize>, TransportError> {
    let Some(header) = buf.get(..FRAME_HEADER_BYTES) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let bound = match (header[4], limits.raft_message_bytes) {
        (kind::RAFT, Some(max)) => {
            if len < GROUP_ID_BYTES {
                return Err(protocol(format!("a RAFT frame of {len} bytes has no group id")));
            }
            GROUP_ID_BYTES + max
        }
        (kind::PING, _) => 0,
        (kind::ACCEPT | kind::REFUSE, None) => MAX_REASON_BYTES,
        (k, _) => return Err(protocol(format!("frame kind {k} is not valid on this side of a link"))),
    };
    if len > bound {
        if header[4] == kind::RAFT {
            return Err(TransportError::TooLarge {
                bytes: len - GROUP_ID_BYTES,
                limit: bound - GROUP_ID_BYTES,
            });
        }
        return Err(protocol(format!(
            "a frame of kind {} and {len} bytes exceeds its limit of {bound}",
            header[4]
        )));
    }
    Ok(Some(len))
}

/// Takes one whole frame from the front of `buf`: `Ok(None)` until it has
/// arrived. A RAFT message is a slice of `buf`'s memory, not a copy.
pub fn decode_frame(buf: &mut BytesMut, limits: FrameLimits) -> Result<Option<Frame>, TransportError> {
    let Some(len) = pending_body(buf, limits)? else {
        return Ok(None);
    };
    if buf.len() < FRAME_HEADER_BYTES + len {
        return Ok(None);
    }
    let kind = buf[4];
    buf.advance(FRAME_HEADER_BYTES);
    let mut body = buf.split_to(len);
    Ok(Some(match kind {
        kind::RAFT => {
            let group_id = body.get_u64_le();
            Frame::Raft {
                group_id,
                message: body.freeze(),
            }
        }
        kind::PING => Frame::Ping,
        kind::ACCEPT => {
            if !body.is_empty() {
                return Err(protocol("an ACCEPT frame carries a body".into()));
            }
            Frame::Accept
        }
        _ => Frame::Refuse(String::from_utf8_lossy(&body).into_owned()),
    }))
}

/// Parses a RAFT frame's message; entry payloads stay slices of `bytes`.
///
/// rust-protobuf 2.28 has RUSTSEC-2024-0437 (stack overflow on crafted
/// input) and no fixed 2.x release. Here: the payload is bounded before
/// parsing; eraftpb's own nesting is at most 4 deep (Message, Snapshot,
/// SnapshotMetadata, ConfState); 2.28 skips an unknown group without
/// recursing (a group inside it is a parse error); and every sender is an
/// authenticated member. A test sends such payloads.
pub fn parse_message(bytes: &Bytes) -> Result<raft::eraftpb::Message, TransportError> {
    raft::eraftpb::Message::parse_from_carllerche_bytes(bytes)
        .map_err(|e| protocol(format!("undecodable raft message: {e}")))
}

/// Raft messages for the crate's tests.
#[cfg(test)]
pub(crate) mod test_messages {
    use bytes::Bytes;
    use raft::eraftpb::{Entry, Message, MessageType};

    /// An append from node 1 to node 2 with one entry per payload size,
    /// each payload a pattern of its own and each entry with a context.
    pub(crate) fn append(payloads: &[usize]) -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        m.from = 1;
        m.to = 2;
        m.term = 3;
        m.index = 10;
        m.commit = 9;
        m.entries = payloads
            .iter()
            .enumerate()
            .map(|(i, &n)| Entry {
                index: 11 + i as u64,
                term: 3,
                data: Bytes::from((0..n).map(|b| (b + i) as u8).collect::<Vec<u8>>()),
                context: Bytes::from_static(b"ctx"),
                ..Default::default()
            })
            .collect::<Vec<_>>()
            .into();
        m
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use raft::eraftpb::Message;

    use super::test_messages::append;
    use super::*;

    const RECEIVER: FrameLimits = FrameLimits {
        raft_message_bytes: Some(1 << 20),
    };
    const SENDER: FrameLimits = FrameLimits {
        raft_message_bytes: None,
    };

    fn hello() -> Hello {
        Hello {
            node_id: 3,
            cluster_id: b"c1".to_vec(),
            secret: b"s3cr3t-token".to_vec(),
        }
    }

    #[test]
    fn a_hello_round_trips_at_any_split() {
        let mut wire = Vec::new();
        encode_hello(&mut wire, &hello()).unwrap();
        encode_empty(&mut wire, kind::PING);
        for cut in 0..wire.len() - FRAME_HEADER_BYTES {
            let mut part = BytesMut::from(&wire[..cut]);
            assert_eq!(decode_hello(&mut part).unwrap(), None, "cut at {cut}");
        }
        let mut all = BytesMut::from(&wire[..]);
        assert_eq!(decode_hello(&mut all).unwrap(), Some(hello()));
        assert_eq!(
            decode_frame(&mut all, RECEIVER).unwrap(),
            Some(Frame::Ping),
            "the rest stays"
        );
    }

    #[test]
    fn a_bad_hello_is_named() {
        let mut http2 = BytesMut::from(&b"PRI * HTTP/2.0\r\n"[..]);
        let e = decode_hello(&mut http2).unwrap_err().to_string();
        assert!(e.contains("magic"), "{e}");
        let mut long = BytesMut::new();
        long.put_slice(&MAGIC);
        long.put_u64_le(1);
        long.put_u16_le(u16::MAX);
        let e = decode_hello(&mut long).unwrap_err().to_string();
        assert!(e.contains("cluster_id of 65535 bytes"), "{e}");
        let big = Hello {
            secret: vec![b'x'; MAX_HELLO_FIELD_BYTES + 1],
            ..hello()
        };
        assert!(encode_hello(&mut Vec::new(), &big).is_err());
    }

    #[test]
    fn raft_frames_round_trip_without_copying_the_payload() {
        let m = append(&[100_000]);
        let size = m.compute_size() as usize;
        let mut encoded = Vec::new();
        encode_raft(&mut encoded, 9, &m, size).unwrap();
        encode_raft(&mut encoded, u64::MAX, &Message::default(), 0).unwrap();
        let mut wire = BytesMut::from(&encoded[..]);
        assert_eq!(wire.len(), 2 * (FRAME_HEADER_BYTES + GROUP_ID_BYTES) + size);
        let base = wire.as_ptr() as usize;
        let Some(Frame::Raft { group_id, message }) = decode_frame(&mut wire, RECEIVER).unwrap() else {
            panic!("not a raft frame");
        };
        assert_eq!(group_id, 9);
        let parsed = parse_message(&message).unwrap();
        assert_eq!(parsed, m);
        let data = parsed.entries[0].data.as_ptr() as usize;
        assert!(
            (base..base + size + 32).contains(&data),
            "the entry's payload was copied out of the receive buffer"
        );
        assert_eq!(
            decode_frame(&mut wire, RECEIVER).unwrap(),
            Some(Frame::Raft {
                group_id: u64::MAX,
                message: Bytes::new()
            })
        );
        assert!(wire.is_empty());
    }

    #[test]
    fn frames_over_their_bound_or_of_the_wrong_side_are_refused_from_the_header() {
        let m = append(&[(1 << 20) + 1]);
        let size = m.compute_size() as usize;
        let mut wire = Vec::new();
        encode_raft(&mut wire, 1, &m, size).unwrap();
        let header = BytesMut::from(&wire[..FRAME_HEADER_BYTES]);
        let e = pending_body(&header, RECEIVER).unwrap_err().to_string();
        assert!(
            e.contains(&format!("message of {size} bytes exceeds the limit of 1048576")),
            "{e}"
        );

        let mut raft_to_sender = Vec::new();
        encode_raft(&mut raft_to_sender, 1, &Message::default(), 0).unwrap();
        assert!(decode_frame(&mut BytesMut::from(&raft_to_sender[..]), SENDER).is_err());
        let mut accept_to_receiver = Vec::new();
        encode_empty(&mut accept_to_receiver, kind::ACCEPT);
        assert!(decode_frame(&mut BytesMut::from(&accept_to_receiver[..]), RECEIVER).is_err());
        let mut unknown = BytesMut::from(&[0u8, 0, 0, 0, 77][..]);
        let e = decode_frame(&mut unknown, RECEIVER).unwrap_err().to_string();
        assert!(e.contains("kind 77"), "{e}");
        let mut short = BytesMut::from(&[3u8, 0, 0, 0, kind::RAFT, 1, 2, 3][..]);
        assert!(
            decode_frame(&mut short, RECEIVER).is_err(),
            "a RAFT frame without a whole group id"
        );
    }

    #[test]
    fn refusals_are_cut_to_their_bound_on_a_character_boundary() {
        let reason = "é".repeat(MAX_REASON_BYTES);
        let mut wire = Vec::new();
        encode_refuse(&mut wire, &reason);
        let Some(Frame::Refuse(got)) = decode_frame(&mut BytesMut::from(&wire[..]), SENDER).unwrap() else {
            panic!("not a refusal");
        };
        assert_eq!(got, "é".repeat(MAX_REASON_BYTES / 2));
    }

    #[test]
    fn a_stale_cached_size_is_refused_and_leaves_the_buffer_as_it_was() {
        let m = append(&[10]);
        let size = m.compute_size() as usize;
        let mut wire = b"before".to_vec();
        assert!(encode_raft(&mut wire, 1, &m, size + 1).is_err());
        assert_eq!(&wire[..], b"before");
    }

    proptest! {
        /// Whatever arrives, the decoders answer with a frame, "not yet" or
        /// an error: never a panic, and never more than they were given.
        #[test]
        fn hostile_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), cut in 0usize..512) {
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = decode_hello(&mut buf);
            for limits in [RECEIVER, SENDER] {
                let mut buf = BytesMut::from(&bytes[..cut.min(bytes.len())]);
                while let Ok(Some(frame)) = decode_frame(&mut buf, limits) {
                    if let Frame::Raft { message, .. } = frame {
                        let _ = parse_message(&message);
                    }
                }
            }
        }

        /// Frames cut anywhere decode the same once the rest arrives.
        #[test]
        fn frames_survive_any_split(payloads in proptest::collection::vec(0usize..3000, 1..8), cut in 0usize..30_000) {
            let mut wire = Vec::new();
            for (i, &p) in payloads.iter().enumerate() {
                let m = append(&[p]);
                let size = m.compute_size() as usize;
                encode_raft(&mut wire, i as u64, &m, size).unwrap();
                encode_empty(&mut wire, kind::PING);
            }
            let cut = cut.min(wire.len());
            let mut buf = BytesMut::from(&wire[..cut]);
            let mut got = Vec::new();
            while let Some(f) = decode_frame(&mut buf, RECEIVER).unwrap() {
                got.push(f);
            }
            buf.extend_from_slice(&wire[cut..]);
            while let Some(f) = decode_frame(&mut buf, RECEIVER).unwrap() {
                got.push(f);
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(got.len(), 2 * payloads.len());
            for (i, pair) in got.chunks(2).enumerate() {
                let Frame::Raft { group_id, message } = &pair[0] else { panic!("not raft") };
                prop_assert_eq!(*group_id, i as u64);
                prop_assert_eq!(parse_message(message).unwrap().entries[0].data.len(), payloads[i]);
                prop_assert_eq!(&pair[1], &Frame::Ping);
            }
        }
    }
}
