//! Micro-benchmarks of the NBD codec on the per-request hot path: what the server
//! (`server.rs`) does for every request and reply, without sockets or tasks.
//!
//! - `request/*`: `parse_request_header` + `validate_request`, and for a WRITE the
//!   payload handling the reader does (a zeroed `BytesMut`, the copy out of the read
//!   buffer, `freeze`).
//! - `reply/*`: the reply headers the writer task encodes into its reused buffer; the
//!   structured READ reply also copies its 4 KiB of data, as `write_all` into the
//!   `BufWriter` does.
//! - `option/*`: one NBD_OPT_GO of the handshake, parsed and answered.
//!
//! Why: these run once per I/O on one reader and one writer task per connection, so
//! their cost bounds the IOPS one connection can carry; regressions here are cheap to
//! catch and invisible in end-to-end fio numbers until they are large.

use std::hint::black_box;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use trireme_nbd::codec::{self, RequestHeader, SessionLimits, cmd, cmd_flag, info, opt, rep};
use trireme_nbd::server::TRANSMISSION_FLAGS;

const BLOCK: u32 = 4096;
const LIMITS: SessionLimits = SessionLimits {
    export_size_bytes: 1 << 40,
    structured_replies: true,
};

/// A request as it sits in the reader's buffer: the 28-byte header, then the payload.
fn wire_request(command: u16, flags: u16, length: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    codec::encode_request_header(
        &mut b,
        &RequestHeader {
            flags,
            command,
            handle: 0x1234_5678_9abc_def0,
            offset: 123 * u64::from(BLOCK),
            length,
        },
    );
    b.put_slice(payload);
    b.to_vec()
}

fn requests(c: &mut Criterion) {
    let payload: Vec<u8> = (0..BLOCK).map(|i| (i * 31) as u8).collect();
    let write = wire_request(cmd::WRITE, cmd_flag::FUA, BLOCK, &payload);
    let read = wire_request(cmd::READ, 0, BLOCK, &[]);

    let mut g = c.benchmark_group("request");
    g.bench_function("decode_read", |b| {
        b.iter(|| {
            let h = codec::parse_request_header(black_box(&read[..]))
                .expect("a valid header")
                .expect("a whole header");
            codec::validate_request(&h, &LIMITS).expect("an accepted request")
        })
    });
    g.throughput(Throughput::Bytes(write.len() as u64));
    g.bench_function("decode_write_4k", |b| {
        b.iter(|| {
            let wire = black_box(&write[..]);
            let h = codec::parse_request_header(wire)
                .expect("a valid header")
                .expect("a whole header");
            let request = codec::validate_request(&h, &LIMITS).expect("an accepted request");
            let codec::Request::Write { length, .. } = request else {
                unreachable!("the request is a WRITE")
            };
            // server.rs read_payload: an unzeroed buffer filled by reads + freeze.
            let mut buf = BytesMut::with_capacity(length as usize);
            buf.extend_from_slice(&wire[codec::REQUEST_HEADER_LEN..codec::REQUEST_HEADER_LEN + length as usize]);
            (request, buf.freeze())
        })
    });
    g.finish();
}

fn replies(c: &mut Criterion) {
    let data = bytes::Bytes::from(vec![0x5a; BLOCK as usize]);
    // The writer task's buffers, reused across replies.
    let mut head = BytesMut::with_capacity(4096 + 64);
    let mut out: Vec<u8> = Vec::with_capacity(256 * 1024);

    let mut g = c.benchmark_group("reply");
    g.bench_function("encode_simple", |b| {
        b.iter(|| {
            head.clear();
            codec::encode_simple_reply(&mut head, black_box(42), 0);
            black_box(&head);
        })
    });
    g.bench_function("encode_structured_done", |b| {
        b.iter(|| {
            head.clear();
            codec::encode_structured_done(&mut head, black_box(42));
            black_box(&head);
        })
    });
    g.throughput(Throughput::Bytes(
        (codec::STRUCTURED_HEADER_LEN + 8) as u64 + u64::from(BLOCK),
    ));
    g.bench_function("encode_structured_read_4k", |b| {
        b.iter(|| {
            head.clear();
            out.clear();
            let d = black_box(&data);
            codec::encode_structured_read_header(&mut head, 42, 123 * u64::from(BLOCK), d.len() as u32);
            out.extend_from_slice(&head);
            out.extend_from_slice(d);
            black_box(&out);
        })
    });
    g.finish();
}

fn options(c: &mut Criterion) {
    // NBD_OPT_GO for "vol-0001" asking for NAME and BLOCK_SIZE, as nbd-client/qemu send it.
    let name = "vol-0001";
    let mut wire = BytesMut::new();
    wire.put_u64(codec::IHAVEOPT);
    wire.put_u32(opt::GO);
    wire.put_u32((4 + name.len() + 2 + 4) as u32);
    wire.put_u32(name.len() as u32);
    wire.put_slice(name.as_bytes());
    wire.put_u16(2);
    wire.put_u16(info::NAME);
    wire.put_u16(info::BLOCK_SIZE);
    let wire = wire.to_vec();
    let mut out = BytesMut::with_capacity(256);

    let mut g = c.benchmark_group("option");
    g.bench_function("parse_go", |b| {
        b.iter(|| {
            let wire = black_box(&wire[..]);
            let h = codec::parse_option_header(wire)
                .expect("a valid option header")
                .expect("a whole header");
            let data = &wire[codec::OPTION_HEADER_LEN..codec::OPTION_HEADER_LEN + h.length as usize];
            codec::parse_option(h.option, data).expect("a valid GO")
        })
    });
    g.bench_function("encode_go_reply", |b| {
        b.iter(|| {
            out.clear();
            codec::encode_info_export(&mut out, opt::GO, black_box(1 << 40), TRANSMISSION_FLAGS);
            codec::encode_info_text(&mut out, opt::GO, info::NAME, black_box(name));
            codec::encode_info_block_size(&mut out, opt::GO);
            codec::encode_option_reply(&mut out, opt::GO, rep::ACK, &[]);
            black_box(&out);
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = requests, replies, options
}
criterion_main!(benches);
