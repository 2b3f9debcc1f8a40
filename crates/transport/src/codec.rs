//! The Raft stream's request codec: raft-rs messages (rust-protobuf)
//! written straight into tonic's send buffer, in `RaftBatch`'s wire format.
//!
//! Through the generated (prost) client every message was encoded twice:
//! by rust-protobuf into a buffer of its own (`GroupMessage.message`), and
//! that buffer again by prost into tonic's. A 1 MiB write sent to two
//! followers cost the leader four copies of its payload; it now costs two.
//! Receivers are unchanged: the bytes on the wire are a `RaftBatch`.

use bytes::BufMut;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
use protobuf::Message as _;
use tonic::Status;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic_prost::ProstCodec;
use trireme_proto::v1::{RaftBatch, RaftStreamEnd};

/// `RaftBatch.messages` and, inside each, `GroupMessage.group_id` and
/// `GroupMessage.message` (proto/trireme/v1/peer.proto).
const BATCH_MESSAGES: u32 = 1;
const GROUP_ID: u32 = 1;
const GROUP_MESSAGE: u32 = 2;

/// Raft messages on their way to one peer, not yet encoded.
#[derive(Default, Clone)]
pub(crate) struct OutBatch {
    messages: Vec<OutMessage>,
}

#[derive(Clone)]
struct OutMessage {
    group_id: u64,
    message: raft::eraftpb::Message,
    /// `message.compute_size()`, which also caches the sizes of its parts
    /// for `write_to_with_cached_sizes`.
    bytes: usize,
}

impl OutMessage {
    /// Encoded length of the `GroupMessage` (without its own key and
    /// length). Fields at their default are left out, as prost does.
    fn group_message_len(&self) -> usize {
        let id = if self.group_id == 0 {
            0
        } else {
            1 + encoded_len_varint(self.group_id)
        };
        let message = if self.bytes == 0 {
            0
        } else {
            1 + encoded_len_varint(self.bytes as u64) + self.bytes
        };
        id + message
    }
}

impl OutBatch {
    /// Adds a message whose `compute_size()` was `bytes`.
    pub(crate) fn push(&mut self, group_id: u64, message: raft::eraftpb::Message, bytes: usize) {
        self.messages.push(OutMessage {
            group_id,
            message,
            bytes,
        });
    }

    pub(crate) fn len(&self) -> usize {
        self.messages.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Bytes `encode` writes.
    pub(crate) fn encoded_len(&self) -> usize {
        self.messages
            .iter()
            .map(|m| {
                let inner = m.group_message_len();
                1 + encoded_len_varint(inner as u64) + inner
            })
            .sum()
    }

    /// Writes the batch as a `RaftBatch`; each message's entries are copied
    /// once, into `buf`.
    pub(crate) fn encode(&self, buf: &mut impl BufMut) -> Result<(), protobuf::ProtobufError> {
        for m in &self.messages {
            encode_key(BATCH_MESSAGES, WireType::LengthDelimited, buf);
            encode_varint(m.group_message_len() as u64, buf);
            if m.group_id != 0 {
                encode_key(GROUP_ID, WireType::Varint, buf);
                encode_varint(m.group_id, buf);
            }
            if m.bytes != 0 {
                encode_key(GROUP_MESSAGE, WireType::LengthDelimited, buf);
                encode_varint(m.bytes as u64, buf);
                let mut writer = (&mut *buf).writer();
                // Payloads larger than its small buffer go to `writer` directly.
                let mut out = protobuf::CodedOutputStream::new(&mut writer);
                m.message.write_to_with_cached_sizes(&mut out)?;
                out.flush()?;
            }
        }
        Ok(())
    }
}

/// The client side of `PeerService/Raft`: [`OutBatch`]es out, the
/// generated decoder for the `RaftStreamEnd` that comes back.
#[derive(Default)]
pub(crate) struct RaftStreamCodec;

pub(crate) struct BatchEncoder;

impl Encoder for BatchEncoder {
    type Item = OutBatch;
    type Error = Status;

    fn encode(&mut self, batch: OutBatch, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        // One allocation for the whole batch instead of doubling as it grows.
        dst.reserve(batch.encoded_len());
        batch
            .encode(dst)
            .map_err(|e| Status::internal(format!("encoding a raft batch: {e}")))
    }
}

impl Codec for RaftStreamCodec {
    type Encode = OutBatch;
    type Decode = RaftStreamEnd;
    type Encoder = BatchEncoder;
    type Decoder = <ProstCodec<RaftBatch, RaftStreamEnd> as Codec>::Decoder;

    fn encoder(&mut self) -> BatchEncoder {
        BatchEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<RaftBatch, RaftStreamEnd>::default().decoder()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use prost::Message as _;
    use raft::eraftpb::{Entry, Message, MessageType};

    use super::*;

    fn append(to: u64, payload_bytes: usize) -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        m.to = to;
        m.from = 1;
        m.term = 7;
        m.index = 41;
        m.log_term = 7;
        m.commit = 40;
        let e = Entry {
            index: 42,
            term: 7,
            data: Bytes::from((0..payload_bytes).map(|i| i as u8).collect::<Vec<u8>>()),
            ..Default::default()
        };
        m.entries = vec![e].into();
        m
    }

    fn batch_of(messages: &[(u64, Message)]) -> OutBatch {
        let mut batch = OutBatch::default();
        for (group, m) in messages {
            let bytes = m.compute_size() as usize;
            batch.push(*group, m.clone(), bytes);
        }
        batch
    }

    /// What goes on the wire decodes as the `RaftBatch` the generated code
    /// would have sent, byte for byte, and each message parses back whole.
    #[test]
    fn batches_encode_as_raft_batch() {
        let messages = vec![
            (3, append(2, 1 << 20)),
            (0, append(3, 0)),
            (u64::MAX, Message::default()),
            (5, append(2, 100)),
        ];
        let batch = batch_of(&messages);
        let mut wire = Vec::new();
        batch.encode(&mut wire).expect("encodes");
        assert_eq!(wire.len(), batch.encoded_len());
        assert_eq!(batch.len(), 4);

        let prost_batch = RaftBatch {
            messages: messages
                .iter()
                .map(|(group, m)| trireme_proto::v1::GroupMessage {
                    group_id: *group,
                    message: m.write_to_bytes().expect("encodes").into(),
                })
                .collect(),
        };
        assert_eq!(wire, prost_batch.encode_to_vec(), "not the generated encoding");

        let decoded = RaftBatch::decode(&wire[..]).expect("decodes");
        assert_eq!(decoded.messages.len(), messages.len());
        for (got, (group, want)) in decoded.messages.iter().zip(&messages) {
            assert_eq!(got.group_id, *group);
            let parsed = Message::parse_from_bytes(&got.message).expect("parses");
            assert_eq!(&parsed, want);
        }
    }

    #[test]
    fn an_empty_batch_is_empty() {
        let batch = OutBatch::default();
        let mut wire = Vec::new();
        batch.encode(&mut wire).expect("encodes");
        assert!(wire.is_empty());
        assert_eq!(batch.encoded_len(), 0);
    }
}
