//! Hostile input against the real handshake: random, nearly-valid byte
//! streams go through a tokio duplex into [`Server::serve_connection`], the
//! same entry point the TCP and Unix listeners use.
//!
//! The property is stateful: a model of the fixed newstyle option phase,
//! built on the pure codec, predicts from the input alone which option
//! replies the server sends (option by option, with the final reply type),
//! and how the handshake ends (closed, or a session opened by EXPORT_NAME or
//! GO). The server must match it exactly, never panic, and always finish:
//! on end of input, or at the handshake deadline when the client stalls.
//!
//! `PROPTEST_CASES=20000 cargo test -p trireme-nbd --test fuzz_handshake`
//! runs it longer.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use trireme_nbd::codec::{self, ClientOption, RequestHeader, cmd, info, opt, rep};
use trireme_nbd::{BlockDevice, DeviceResult, ExportInfo, ExportRegistry, OpenedExport, Server, ServerConfig};

const EXPORT: &str = "vol";
const EXPORT_BYTES: u64 = 1 << 20;
const MAX_OPTIONS: usize = 4;
/// Option data longer than this is skipped whole, longer than 16 MiB the
/// server hangs up (server.rs MAX_SKIPPABLE_OPTION_BYTES).
const MAX_SKIPPABLE: u32 = 16 * 1024 * 1024;
/// How long a handshake that should end by itself may take.
const FINISH_WITHIN: Duration = Duration::from_secs(10);

/// `default` cases, or `PROPTEST_CASES` for a long run.
fn cases(default: u32) -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok());
    ProptestConfig {
        cases: n.unwrap_or(default),
        // Runners built by hand have no source file to persist failures next to.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

struct Zeroes;

impl BlockDevice for Zeroes {
    async fn read(&self, _: u64, length: u32) -> DeviceResult<Bytes> {
        Ok(Bytes::from(vec![0u8; length as usize]))
    }
    async fn write(&self, _: u64, _: Bytes, _: bool) -> DeviceResult<()> {
        Ok(())
    }
    async fn write_zeroes(&self, _: u64, _: u32, _: bool, _: bool, _: bool) -> DeviceResult<()> {
        Ok(())
    }
    async fn trim(&self, _: u64, _: u32, _: bool) -> DeviceResult<()> {
        Ok(())
    }
    async fn flush(&self) -> DeviceResult<()> {
        Ok(())
    }
}

struct OneExport;

impl ExportRegistry for OneExport {
    type Device = Zeroes;
    fn list(&self) -> Vec<ExportInfo> {
        self.describe(EXPORT).into_iter().collect()
    }
    fn describe(&self, name: &str) -> Option<ExportInfo> {
        (name == EXPORT).then(|| ExportInfo {
            name: EXPORT.into(),
            description: "fuzz target".into(),
            size_bytes: EXPORT_BYTES,
        })
    }
    fn open(&self, name: &str) -> Result<OpenedExport<Zeroes>, String> {
        let info = self.describe(name).ok_or_else(|| format!("no export \"{name}\""))?;
        // A dropped sender means "never revoked".
        let (_tx, revoked) = watch::channel(false);
        Ok(OpenedExport {
            info,
            device: Arc::new(Zeroes),
            revoked,
        })
    }
}

// ---------------------------------------------------------------------------
// The model

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The server hangs up (a protocol violation, ABORT, end of input, too
    /// many options, an unknown EXPORT_NAME).
    Closed,
    /// The input ran out mid-frame and the client keeps the stream open:
    /// the server waits, until the handshake deadline.
    Stalled,
    /// EXPORT_NAME opened the export: its reply follows the option replies.
    ExportName { no_zeroes: bool },
    /// GO opened the export (its replies end with an ACK).
    Go,
}

#[derive(Debug)]
struct Expected {
    /// (option, final reply type) in order.
    replies: Vec<(u32, u32)>,
    end: End,
    /// Input bytes the handshake consumed (what follows belongs to the
    /// session, if one opened).
    consumed: usize,
}

/// What the server must do with `input`; `eof`: the client closes its
/// side after sending it.
fn model(input: &[u8], eof: bool) -> Expected {
    let mut replies = Vec::new();
    let short = if eof { End::Closed } else { End::Stalled };
    let mut at = 0;
    let done = |replies, end, consumed| Expected { replies, end, consumed };
    let Some(flag_bytes) = input.get(..4) else {
        return done(replies, short, at);
    };
    let client = match codec::parse_client_flags(flag_bytes) {
        Ok(Some(c)) => c,
        _ => return done(replies, End::Closed, at),
    };
    at = 4;
    for _ in 0..MAX_OPTIONS {
        let rest = &input[at..];
        let h = match codec::parse_option_header(rest) {
            Ok(Some(h)) => h,
            Ok(None) => return done(replies, short, at),
            Err(_) => return done(replies, End::Closed, at),
        };
        at += codec::OPTION_HEADER_LEN;
        let len = h.length as usize;
        let available = input.len() - at;
        if h.length > codec::MAX_OPTION_DATA_BYTES {
            if h.length > MAX_SKIPPABLE {
                return done(replies, End::Closed, at);
            }
            // Skipped unread; a skip cut short by end of input still gets
            // its reply.
            if available < len && !eof {
                return done(replies, End::Stalled, at);
            }
            at += available.min(len);
            replies.push((h.option, rep::ERR_TOO_BIG));
            continue;
        }
        if available < len {
            return done(replies, short, at);
        }
        let data = &input[at..at + len];
        at += len;
        let parsed = match codec::parse_option(h.option, data) {
            Ok(p) => p,
            Err(_) => {
                replies.push((h.option, rep::ERR_INVALID));
                continue;
            }
        };
        match parsed {
            ClientOption::ExportName(name) if name == EXPORT => {
                return done(
                    replies,
                    End::ExportName {
                        no_zeroes: client.no_zeroes,
                    },
                    at,
                );
            }
            // No error reply exists for EXPORT_NAME.
            ClientOption::ExportName(_) => return done(replies, End::Closed, at),
            ClientOption::Abort => {
                replies.push((h.option, rep::ACK));
                return done(replies, End::Closed, at);
            }
            ClientOption::Go { name, .. } if name == EXPORT => {
                replies.push((h.option, rep::ACK));
                return done(replies, End::Go, at);
            }
            ClientOption::Info { name, .. } | ClientOption::Go { name, .. } => {
                let t = if name == EXPORT { rep::ACK } else { rep::ERR_UNKNOWN };
                replies.push((h.option, t));
            }
            ClientOption::List | ClientOption::StructuredReply => replies.push((h.option, rep::ACK)),
            ClientOption::StartTls
            | ClientOption::ListMetaContext
            | ClientOption::SetMetaContext
            | ClientOption::ExtendedHeaders
            | ClientOption::Unknown(_) => replies.push((h.option, rep::ERR_UNSUP)),
        }
    }
    // More options than a handshake may carry.
    done(replies, End::Closed, at)
}

// ---------------------------------------------------------------------------
// Reading the server's side

fn take<'a>(out: &mut &'a [u8], n: usize, what: &str) -> Result<&'a [u8], TestCaseError> {
    if out.len() < n {
        return Err(TestCaseError::fail(format!(
            "output ends {} bytes into {what} ({n} bytes expected)",
            out.len()
        )));
    }
    let (a, b) = out.split_at(n);
    *out = b;
    Ok(a)
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Checks the greeting and the option replies against the model; returns
/// what follows them (the session's bytes, if one opened).
fn check_output<'a>(mut out: &'a [u8], expected: &Expected) -> Result<&'a [u8], TestCaseError> {
    let greeting = take(&mut out, 18, "the greeting")?;
    prop_assert_eq!(&greeting[..8], b"NBDMAGIC");
    prop_assert_eq!(&greeting[8..16], b"IHAVEOPT");
    prop_assert_eq!(&greeting[16..], &[0, 3]);
    for (i, &(option, final_type)) in expected.replies.iter().enumerate() {
        let mut saw_export_info = false;
        loop {
            let what = format!("reply {i} (option {option})");
            let h = take(&mut out, 20, &what)?;
            prop_assert_eq!(be_u64(h), codec::OPTION_REPLY_MAGIC, "{}", what);
            prop_assert_eq!(be_u32(&h[8..]), option, "{} echoes another option", what);
            let reply_type = be_u32(&h[12..]);
            let len = be_u32(&h[16..]) as usize;
            prop_assert!(len <= 64 * 1024, "{} carries {} bytes", what, len);
            let data = take(&mut out, len, &what)?;
            if reply_type == rep::ACK || reply_type & (1 << 31) != 0 {
                prop_assert_eq!(reply_type, final_type, "{} ends with another reply type", what);
                if final_type == rep::ACK && (option == opt::INFO || option == opt::GO) {
                    prop_assert!(saw_export_info, "{} acknowledged without the export's size", what);
                }
                break;
            }
            match reply_type {
                rep::SERVER => prop_assert_eq!(option, opt::LIST, "{}", what),
                rep::INFO => {
                    prop_assert!(option == opt::INFO || option == opt::GO, "{}", what);
                    prop_assert!(data.len() >= 2, "{}", what);
                    if u16::from_be_bytes([data[0], data[1]]) == info::EXPORT {
                        prop_assert_eq!(data.len(), 12, "{}", what);
                        prop_assert_eq!(be_u64(&data[2..]), EXPORT_BYTES, "{}", what);
                        saw_export_info = true;
                    }
                }
                other => prop_assert!(false, "{} has reply type {:#x}", what, other),
            }
        }
    }
    match expected.end {
        End::Closed | End::Stalled => prop_assert!(out.is_empty(), "{} bytes after the last reply", out.len()),
        End::ExportName { no_zeroes } => {
            let reply = take(&mut out, if no_zeroes { 10 } else { 134 }, "the EXPORT_NAME reply")?;
            prop_assert_eq!(be_u64(reply), EXPORT_BYTES);
            prop_assert!(reply[10..].iter().all(|b| *b == 0));
        }
        End::Go => {}
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Inputs

#[derive(Debug, Clone)]
enum Length {
    True,
    Over(u32),
    Under(u32),
    Exactly(u32),
}

#[derive(Debug, Clone)]
struct ClientOpt {
    magic: u64,
    option: u32,
    data: Vec<u8>,
    length: Length,
}

#[derive(Debug, Clone)]
struct Input {
    flags: u32,
    options: Vec<ClientOpt>,
    /// Bytes after the options: request headers, or garbage.
    trailer: Vec<u8>,
    /// Cut the stream at this fraction (in 1/256) of its length.
    cut: Option<u8>,
}

impl Input {
    fn bytes(&self) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_u32(self.flags);
        for o in &self.options {
            b.put_u64(o.magic);
            b.put_u32(o.option);
            b.put_u32(match o.length {
                Length::True => o.data.len() as u32,
                Length::Over(d) => o.data.len() as u32 + d,
                Length::Under(d) => (o.data.len() as u32).saturating_sub(d),
                Length::Exactly(n) => n,
            });
            b.put_slice(&o.data);
        }
        b.put_slice(&self.trailer);
        let mut v = b.to_vec();
        if let Some(c) = self.cut {
            v.truncate(v.len() * usize::from(c) / 256);
        }
        v
    }
}

fn name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => Just(EXPORT.as_bytes().to_vec()),
        1 => Just(b"nope".to_vec()),
        1 => Just(vec![0xff, 0xfe]),
        1 => prop::collection::vec(any::<u8>(), 0..8),
    ]
}

fn info_data() -> impl Strategy<Value = Vec<u8>> {
    (
        name(),
        prop::collection::vec(prop_oneof![0u16..4, any::<u16>()], 0..4),
        prop_oneof![4 => Just(None), 1 => any::<u32>().prop_map(Some)],
        prop_oneof![4 => Just(None), 1 => any::<u16>().prop_map(Some)],
    )
        .prop_map(|(name, reqs, name_len, count)| {
            let mut d = BytesMut::new();
            d.put_u32(name_len.unwrap_or(name.len() as u32));
            d.put_slice(&name);
            d.put_u16(count.unwrap_or(reqs.len() as u16));
            for r in reqs {
                d.put_u16(r);
            }
            d.to_vec()
        })
}

fn client_opt() -> impl Strategy<Value = ClientOpt> {
    let option = prop_oneof![
        10 => 1u32..=11,
        1 => Just(0u32),
        1 => Just(12u32),
        1 => any::<u32>(),
    ];
    let magic = prop_oneof![20 => Just(codec::IHAVEOPT), 1 => any::<u64>()];
    let length = prop_oneof![
        16 => Just(Length::True),
        1 => (1u32..8).prop_map(Length::Over),
        1 => (1u32..8).prop_map(Length::Under),
        1 => prop_oneof![
            Just(codec::MAX_OPTION_DATA_BYTES + 1),
            Just(MAX_SKIPPABLE),
            Just(MAX_SKIPPABLE + 1),
            Just(u32::MAX),
        ]
        .prop_map(Length::Exactly),
    ];
    (magic, option, length)
        .prop_flat_map(|(magic, option, length)| {
            let data = match option {
                opt::EXPORT_NAME => prop_oneof![4 => name(), 1 => prop::collection::vec(any::<u8>(), 0..16)].boxed(),
                opt::INFO | opt::GO => {
                    prop_oneof![4 => info_data(), 1 => prop::collection::vec(any::<u8>(), 0..16)].boxed()
                }
                _ => prop_oneof![3 => Just(Vec::new()), 1 => prop::collection::vec(any::<u8>(), 0..16)].boxed(),
            };
            (Just(magic), Just(option), data, Just(length))
        })
        .prop_map(|(magic, option, data, length)| ClientOpt {
            magic,
            option,
            data,
            length,
        })
}

fn trailer() -> impl Strategy<Value = Vec<u8>> {
    let request = (
        0u16..8,
        prop_oneof![Just(0u16), Just(1u16), any::<u16>()],
        0u64..(2 << 20),
        0u32..8192,
    )
        .prop_map(|(command, flags, offset, length)| {
            let mut b = BytesMut::new();
            let h = RequestHeader {
                flags,
                command,
                handle: offset ^ 0x5a5a,
                offset,
                length,
            };
            codec::encode_request_header(&mut b, &h);
            if command == cmd::WRITE {
                b.put_bytes(0xab, (length as usize).min(64));
            }
            b.to_vec()
        });
    prop_oneof![
        2 => Just(Vec::new()),
        2 => prop::collection::vec(request, 1..4).prop_map(|v| v.concat()),
        1 => prop::collection::vec(any::<u8>(), 1..40),
    ]
}

fn input() -> impl Strategy<Value = Input> {
    (
        prop_oneof![8 => 0u32..4, 1 => any::<u32>()],
        prop::collection::vec(client_opt(), 0..6),
        trailer(),
        prop_oneof![6 => Just(None), 1 => any::<u8>().prop_map(Some)],
    )
        .prop_map(|(flags, options, trailer, cut)| Input {
            flags,
            options,
            trailer,
            cut,
        })
}

// ---------------------------------------------------------------------------
// Driving the server

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn server(handshake_timeout_ms: u64) -> (Arc<Server<OneExport>>, watch::Sender<bool>) {
    let (stop, shutdown) = watch::channel(false);
    let config = ServerConfig {
        max_options_per_handshake: MAX_OPTIONS,
        handshake_timeout_ms,
        ..ServerConfig::default()
    };
    (Server::new(Arc::new(OneExport), config, shutdown), stop)
}

/// Sends `input`, closes the client's side when `eof`, and returns what
/// the server sent and whether it finished within `finish_within`.
async fn drive(
    server: Arc<Server<OneExport>>,
    input: Vec<u8>,
    eof: bool,
    finish_within: Duration,
) -> Result<(Vec<u8>, bool), TestCaseError> {
    let (client, server_end) = tokio::io::duplex(64 * 1024);
    let task = tokio::spawn(async move { server.serve_connection(server_end, "fuzz".into()).await });
    let (mut rd, mut wr) = tokio::io::split(client);
    let reader = tokio::spawn(async move {
        let mut out = Vec::new();
        let _ = rd.read_to_end(&mut out).await;
        out
    });
    // The server may hang up before reading it all.
    let _ = wr.write_all(&input).await;
    if eof {
        let _ = wr.shutdown().await;
    }
    let finished = match tokio::time::timeout(finish_within, task).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => return Err(TestCaseError::fail(format!("the server task failed: {e}"))),
        Err(_) => false,
    };
    drop(wr);
    let out = match tokio::time::timeout(FINISH_WITHIN, reader).await {
        Ok(Ok(out)) => out,
        _ => return Err(TestCaseError::fail("the server side never closed")),
    };
    Ok((out, finished))
}

/// Random streams that end: the server follows the model exactly and
/// finishes without waiting for its deadline.
#[test]
fn fuzz_handshake_matches_the_model() {
    let rt = runtime();
    let mut runner = TestRunner::new(cases(256));
    // How each handshake ended: closed, (stalled), export name, go.
    let ends = std::cell::RefCell::new([0usize; 4]);
    runner
        .run(&input(), |input| {
            let bytes = input.bytes();
            let expected = model(&bytes, true);
            ends.borrow_mut()[match expected.end {
                End::Closed => 0,
                End::Stalled => 1,
                End::ExportName { .. } => 2,
                End::Go => 3,
            }] += 1;
            let (server, _stop) = server(60_000);
            let (out, finished) = rt.block_on(drive(server, bytes, true, FINISH_WITHIN))?;
            prop_assert!(finished, "the handshake did not finish on end of input");
            check_output(&out, &expected)?;
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let ends = ends.into_inner();
    eprintln!("handshake endings (closed, stalled, export name, go): {ends:?}");
    // The generator reaches every ending (checked on runs of useful size).
    if ends.iter().sum::<usize>() >= 200 {
        assert!(ends[0] > 0 && ends[2] > 0 && ends[3] > 0, "{ends:?}");
    }
}

/// A client that stops mid-frame and keeps the stream open is cut off at
/// the handshake deadline, after the replies its complete options earned.
#[test]
fn fuzz_handshake_stalled_client_is_cut_at_the_deadline() {
    let rt = runtime();
    let deadline = Duration::from_millis(250);
    let mut runner = TestRunner::new(cases(16));
    runner
        .run(&input(), |input| {
            let mut bytes = input.bytes();
            // Cut inside the stream so that it stalls.
            let mut expected = model(&bytes, false);
            while expected.end != End::Stalled && !bytes.is_empty() {
                bytes.pop();
                expected = model(&bytes, false);
            }
            if expected.end != End::Stalled {
                return Ok(());
            }
            let (server, _stop) = server(deadline.as_millis() as u64);
            let started = std::time::Instant::now();
            let (out, finished) = rt.block_on(drive(server, bytes, false, deadline + FINISH_WITHIN))?;
            prop_assert!(finished, "a stalled handshake outlived its deadline");
            prop_assert!(
                started.elapsed() >= deadline,
                "a stalled handshake ended before its deadline ({:?})",
                started.elapsed()
            );
            check_output(&out, &expected)?;
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
}

/// A session opened at the end of the handshake stays open while the
/// client does, and ends when it goes.
#[test]
fn fuzz_handshake_opened_session_waits_for_the_client() {
    let rt = runtime();
    let mut runner = TestRunner::new(cases(16));
    runner
        .run(&input(), |input| {
            let mut bytes = input.bytes();
            let expected = model(&bytes, false);
            if !matches!(expected.end, End::ExportName { .. } | End::Go) {
                return Ok(());
            }
            // Just the handshake: no requests.
            bytes.truncate(expected.consumed);
            let (server, _stop) = server(100);
            rt.block_on(async {
                let (client, server_end) = tokio::io::duplex(64 * 1024);
                let task = tokio::spawn(async move { server.serve_connection(server_end, "fuzz".into()).await });
                let (mut rd, mut wr) = tokio::io::split(client);
                wr.write_all(&bytes)
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                // Well past the handshake deadline: the session is not cut.
                let mut task = task;
                let waited = tokio::time::timeout(Duration::from_millis(300), &mut task).await;
                prop_assert!(waited.is_err(), "the session ended while the client was still there");
                // (Dropping a split half would not close the stream.)
                let _ = wr.shutdown().await;
                let ended = tokio::time::timeout(FINISH_WITHIN, task).await;
                prop_assert!(matches!(ended, Ok(Ok(()))), "the session did not end with its client");
                let mut out = Vec::new();
                let _ = rd.read_to_end(&mut out).await;
                let rest = check_output(&out, &expected)?;
                prop_assert!(rest.is_empty(), "{} unexpected bytes after the handshake", rest.len());
                Ok(())
            })
        })
        .unwrap_or_else(|e| panic!("{e}"));
}
