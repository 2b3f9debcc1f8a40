//! A tokio NBD server: fixed newstyle handshake, then a transmission phase
//! that keeps many requests in flight per connection and replies as each
//! completes, matched by handle.
//!
//! Per connection there is one reader (this task), one task per request, and
//! one writer task that serialises replies. Bounds: connections per server,
//! requests and bytes in flight per connection, option count and size in
//! the handshake, and a handshake deadline.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tracing::{Instrument, debug, info, warn};

use crate::codec::{self, ClientOption, Errno, Request, SessionLimits, opt, rep, tflag};
use crate::{BlockDevice, DeviceError, ExportRegistry, OpenedExport};

/// Transmission flags every export advertises. CAN_MULTI_CONN is truthful
/// because [`BlockDevice::flush`] covers writes acknowledged on any session.
pub const TRANSMISSION_FLAGS: u16 = tflag::HAS_FLAGS
    | tflag::SEND_FLUSH
    | tflag::SEND_FUA
    | tflag::SEND_TRIM
    | tflag::SEND_WRITE_ZEROES
    | tflag::CAN_MULTI_CONN
    | tflag::SEND_CACHE
    | tflag::SEND_FAST_ZERO;

/// Option payloads longer than this are not even skipped: the client is
/// hung up on (proto.md allows a hard disconnect for denial-of-service sizes).
const MAX_SKIPPABLE_OPTION_BYTES: u32 = 16 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Open connections across all listeners; more are accepted and closed.
    pub max_connections: usize,
    /// Requests in flight per connection before the reader stops reading.
    pub max_inflight_requests_per_connection: usize,
    /// Payload bytes (write data, read buffers) in flight per connection.
    /// At least one maximum payload.
    pub max_inflight_bytes_per_connection: usize,
    /// Time a client has to finish the handshake.
    pub handshake_timeout_ms: u64,
    /// Options a client may send in one handshake.
    pub max_options_per_handshake: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 256,
            max_inflight_requests_per_connection: 128,
            max_inflight_bytes_per_connection: 64 * 1024 * 1024,
            handshake_timeout_ms: 30_000,
            max_options_per_handshake: 64,
        }
    }
}

/// Why a connection ended early; logged, never sent.
#[derive(Debug, thiserror::Error)]
enum ConnectionEnd {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("protocol: {0}")]
    Frame(#[from] codec::FrameError),
    #[error("{0}")]
    Refused(String),
}

pub struct Server<R: ExportRegistry> {
    registry: Arc<R>,
    config: ServerConfig,
    connections: Arc<Semaphore>,
    shutdown: watch::Receiver<bool>,
}

struct Reply {
    handle: u64,
    /// READ offset, for the structured OFFSET_DATA chunk.
    offset: u64,
    result: Result<Option<Bytes>, DeviceError>,
    /// Held until the reply is on the wire, so in-flight bounds include
    /// replies waiting to be written.
    _permits: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

impl<R: ExportRegistry> Server<R> {
    /// `shutdown` turning `true` stops the listeners; sessions finish the
    /// requests already read, send their replies, and close.
    pub fn new(registry: Arc<R>, mut config: ServerConfig, shutdown: watch::Receiver<bool>) -> Arc<Self> {
        config.max_inflight_bytes_per_connection = config
            .max_inflight_bytes_per_connection
            .max(codec::MAX_PAYLOAD_BYTES as usize);
        config.max_inflight_requests_per_connection = config.max_inflight_requests_per_connection.max(1);
        let connections = Arc::new(Semaphore::new(config.max_connections));
        Arc::new(Server {
            registry,
            config,
            connections,
            shutdown,
        })
    }

    pub fn open_connections(&self) -> usize {
        self.config.max_connections - self.connections.available_permits()
    }

    /// Waits until every connection has closed, or the timeout passes;
    /// returns whether all closed.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let all = self.config.max_connections as u32;
        tokio::time::timeout(timeout, self.connections.acquire_many(all))
            .await
            .is_ok()
    }

    fn admit(&self) -> Option<OwnedSemaphorePermit> {
        match self.connections.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                warn!(
                    max = self.config.max_connections,
                    "NBD connection limit reached; closing new connection"
                );
                metrics::counter!("trireme_nbd_connections_refused_total").increment(1);
                None
            }
        }
    }

    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        let mut shutdown = self.shutdown.clone();
        loop {
            let accepted = tokio::select! {
                _ = raised(&mut shutdown) => break,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let Some(permit) = self.admit() else { continue };
                    let _ = stream.set_nodelay(true);
                    let me = self.clone();
                    tokio::spawn(async move {
                        me.serve_connection(stream, peer.to_string()).await;
                        drop(permit);
                    });
                }
                Err(e) => accept_error_pause(e).await,
            }
        }
    }

    pub async fn serve_unix(self: Arc<Self>, listener: UnixListener) {
        let mut shutdown = self.shutdown.clone();
        loop {
            let accepted = tokio::select! {
                _ = raised(&mut shutdown) => break,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, _)) => {
                    let Some(permit) = self.admit() else { continue };
                    let me = self.clone();
                    tokio::spawn(async move {
                        me.serve_connection(stream, "unix".to_string()).await;
                        drop(permit);
                    });
                }
                Err(e) => accept_error_pause(e).await,
            }
        }
    }

    /// Runs one connection to its end. Public so tests and other transports
    /// can hand in any byte stream.
    pub async fn serve_connection<S>(&self, mut stream: S, peer: String)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        metrics::gauge!("trireme_nbd_connections").increment(1.0);
        let timeout = Duration::from_millis(self.config.handshake_timeout_ms);
        let mut shutdown = self.shutdown.clone();
        let negotiated = tokio::select! {
            _ = raised(&mut shutdown) => Ok(None),
            r = tokio::time::timeout(timeout, self.handshake(&mut stream)) => match r {
                Ok(r) => r,
                Err(_) => Err(ConnectionEnd::Refused(format!("handshake not finished within {timeout:?}"))),
            },
        };
        match negotiated {
            Ok(Some((export, structured))) => {
                info!(%peer, export = %export.info.name, structured, "NBD session open");
                let name = export.info.name.clone();
                match self.transmission(stream, export, structured).await {
                    Ok(()) => info!(%peer, export = %name, "NBD session closed"),
                    Err(e) => info!(%peer, export = %name, "NBD session ended: {e}"),
                }
            }
            Ok(None) => debug!(%peer, "NBD handshake ended without a session"),
            Err(e) => warn!(%peer, "NBD handshake failed: {e}"),
        }
        metrics::gauge!("trireme_nbd_connections").decrement(1.0);
    }

    async fn handshake<S>(&self, s: &mut S) -> Result<Option<(OpenedExport<R::Device>, bool)>, ConnectionEnd>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut out = BytesMut::with_capacity(256);
        codec::encode_server_greeting(&mut out);
        s.write_all(&out).await?;
        let mut cf = [0u8; 4];
        s.read_exact(&mut cf).await?;
        let client =
            codec::parse_client_flags(&cf)?.ok_or_else(|| ConnectionEnd::Refused("short client flags".into()))?;
        let mut structured = false;
        for _ in 0..self.config.max_options_per_handshake {
            let mut oh = [0u8; codec::OPTION_HEADER_LEN];
            s.read_exact(&mut oh).await?;
            let h =
                codec::parse_option_header(&oh)?.ok_or_else(|| ConnectionEnd::Refused("short option header".into()))?;
            out.clear();
            if h.length > codec::MAX_OPTION_DATA_BYTES {
                if h.length > MAX_SKIPPABLE_OPTION_BYTES {
                    return Err(ConnectionEnd::Refused(format!("option data of {} bytes", h.length)));
                }
                tokio::io::copy(&mut (&mut *s).take(u64::from(h.length)), &mut tokio::io::sink()).await?;
                let msg = format!(
                    "option data of {} bytes exceeds {}",
                    h.length,
                    codec::MAX_OPTION_DATA_BYTES
                );
                codec::encode_option_reply(&mut out, h.option, rep::ERR_TOO_BIG, msg.as_bytes());
                s.write_all(&out).await?;
                continue;
            }
            let mut data = vec![0u8; h.length as usize];
            s.read_exact(&mut data).await?;
            let parsed = match codec::parse_option(h.option, &data) {
                Ok(o) => o,
                Err(invalid) => {
                    codec::encode_option_reply(&mut out, h.option, rep::ERR_INVALID, invalid.0.as_bytes());
                    s.write_all(&out).await?;
                    continue;
                }
            };
            match parsed {
                ClientOption::ExportName(name) => {
                    // No error reply exists for EXPORT_NAME: the spec says terminate.
                    let export = self.registry.open(&name).map_err(ConnectionEnd::Refused)?;
                    codec::encode_export_name_reply(
                        &mut out,
                        export.info.size_bytes,
                        TRANSMISSION_FLAGS,
                        client.no_zeroes,
                    );
                    s.write_all(&out).await?;
                    return Ok(Some((export, structured)));
                }
                ClientOption::Abort => {
                    codec::encode_option_reply(&mut out, h.option, rep::ACK, &[]);
                    // The client may already have closed; the ACK is best effort.
                    let _ = s.write_all(&out).await;
                    return Ok(None);
                }
                ClientOption::List => {
                    for e in self.registry.list() {
                        codec::encode_rep_server(&mut out, &e.name, &e.description);
                    }
                    codec::encode_option_reply(&mut out, h.option, rep::ACK, &[]);
                }
                ClientOption::Info { name, requests } | ClientOption::Go { name, requests } => {
                    let go = h.option == opt::GO;
                    let opened = if go {
                        self.registry.open(&name).map(Some)
                    } else {
                        self.registry
                            .describe(&name)
                            .map(|_| None)
                            .ok_or_else(|| format!("export \"{name}\" not found"))
                    };
                    let opened = match opened {
                        Ok(o) => o,
                        Err(msg) => {
                            codec::encode_option_reply(&mut out, h.option, rep::ERR_UNKNOWN, msg.as_bytes());
                            s.write_all(&out).await?;
                            continue;
                        }
                    };
                    let info = match (&opened, self.registry.describe(&name)) {
                        (Some(o), _) => o.info.clone(),
                        (None, Some(i)) => i,
                        (None, None) => {
                            let msg = format!("export \"{name}\" not found");
                            codec::encode_option_reply(&mut out, h.option, rep::ERR_UNKNOWN, msg.as_bytes());
                            s.write_all(&out).await?;
                            continue;
                        }
                    };
                    codec::encode_info_export(&mut out, h.option, info.size_bytes, TRANSMISSION_FLAGS);
                    if requests.contains(&codec::info::NAME) {
                        codec::encode_info_text(&mut out, h.option, codec::info::NAME, &info.name);
                    }
                    if requests.contains(&codec::info::DESCRIPTION) {
                        codec::encode_info_text(&mut out, h.option, codec::info::DESCRIPTION, &info.description);
                    }
                    codec::encode_info_block_size(&mut out, h.option);
                    codec::encode_option_reply(&mut out, h.option, rep::ACK, &[]);
                    s.write_all(&out).await?;
                    if let Some(export) = opened {
                        return Ok(Some((export, structured)));
                    }
                    continue;
                }
                ClientOption::StructuredReply => {
                    structured = true;
                    codec::encode_option_reply(&mut out, h.option, rep::ACK, &[]);
                }
                ClientOption::StartTls => {
                    let msg = "TLS is not supported by this server";
                    codec::encode_option_reply(&mut out, h.option, rep::ERR_UNSUP, msg.as_bytes());
                }
                ClientOption::ListMetaContext | ClientOption::SetMetaContext => {
                    let msg = "metadata contexts (block status) are not supported";
                    codec::encode_option_reply(&mut out, h.option, rep::ERR_UNSUP, msg.as_bytes());
                }
                ClientOption::ExtendedHeaders => {
                    let msg = "extended headers are not supported";
                    codec::encode_option_reply(&mut out, h.option, rep::ERR_UNSUP, msg.as_bytes());
                }
                ClientOption::Unknown(n) => {
                    let msg = format!("option {n} is not supported");
                    codec::encode_option_reply(&mut out, h.option, rep::ERR_UNSUP, msg.as_bytes());
                }
            }
            s.write_all(&out).await?;
        }
        Err(ConnectionEnd::Refused(format!(
            "more than {} options in one handshake",
            self.config.max_options_per_handshake
        )))
    }

    async fn transmission<S>(
        &self,
        stream: S,
        export: OpenedExport<R::Device>,
        structured: bool,
    ) -> Result<(), ConnectionEnd>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let limits = SessionLimits {
            export_size_bytes: export.info.size_bytes,
            structured_replies: structured,
        };
        let (rd, wr) = tokio::io::split(stream);
        let mut rd = BufReader::with_capacity(128 * 1024, rd);
        let (tx, rx) = mpsc::channel::<Reply>(self.config.max_inflight_requests_per_connection + 4);
        let writer = tokio::spawn(write_replies(wr, rx, structured));
        let requests = Arc::new(Semaphore::new(self.config.max_inflight_requests_per_connection));
        let bytes = Arc::new(Semaphore::new(self.config.max_inflight_bytes_per_connection));
        let mut shutdown = self.shutdown.clone();
        let mut revoked = export.revoked.clone();
        let device = export.device;
        let io_metrics = Arc::new(IoMetrics::new(&export.info.name));
        io_metrics.sessions.increment(1.0);
        let volume = export.info.name.clone();
        let mut header = [0u8; codec::REQUEST_HEADER_LEN];
        let outcome: Result<(), ConnectionEnd> = loop {
            let read = tokio::select! {
                biased;
                _ = raised(&mut shutdown) => break Ok(()),
                _ = raised(&mut revoked) => break Err(ConnectionEnd::Refused("export revoked".into())),
                r = rd.read_exact(&mut header) => r,
            };
            match read {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
                Err(e) => break Err(e.into()),
            }
            let h = match codec::parse_request_header(&header) {
                Ok(Some(h)) => h,
                Ok(None) => break Err(ConnectionEnd::Refused("short request header".into())),
                Err(e) => break Err(e.into()),
            };
            let request = match codec::validate_request(&h, &limits) {
                Ok(r) => r,
                Err(refused) => {
                    metrics::counter!("trireme_nbd_requests_refused_total").increment(1);
                    debug!(handle = h.handle, "request refused: {}", refused.message);
                    if refused.skip_payload_bytes > 0 {
                        let want = u64::from(refused.skip_payload_bytes);
                        match tokio::io::copy(&mut (&mut rd).take(want), &mut tokio::io::sink()).await {
                            Ok(n) if n == want => {}
                            Ok(_) => break Ok(()),
                            Err(e) => break Err(e.into()),
                        }
                    }
                    let reply = Reply {
                        handle: h.handle,
                        offset: h.offset,
                        result: Err(DeviceError::new(refused.errno, refused.message)),
                        _permits: None,
                    };
                    if tx.send(reply).await.is_err() {
                        break Ok(());
                    }
                    if refused.disconnect {
                        break Err(ConnectionEnd::Refused("payload too large to skip".into()));
                    }
                    continue;
                }
            };
            if request == Request::Disconnect {
                break Ok(());
            }
            let cost = match request {
                Request::Read { length, .. } | Request::Write { length, .. } => length.max(1),
                _ => 1,
            };
            let (Ok(rp), Ok(bp)) = (
                requests.clone().acquire_owned().await,
                bytes.clone().acquire_many_owned(cost).await,
            ) else {
                break Ok(());
            };
            let payload = if let Request::Write { length, .. } = request {
                // A client that hangs up mid-payload loses this write, and only this write.
                match read_payload(&mut rd, length as usize).await {
                    Ok(buf) => buf,
                    Err(e) => break Err(e.into()),
                }
            } else {
                Bytes::new()
            };
            let device = device.clone();
            let tx = tx.clone();
            let io_metrics = io_metrics.clone();
            // One span per request at debug level: the device's proposal,
            // log write and commit events nest under it.
            let span = tracing::debug_span!("nbd_request", volume = %volume, handle = h.handle, op = command_name(&request), offset = h.offset, length = h.length);
            tokio::spawn(
                async move {
                    let op = io_metrics.op(&request);
                    op.inflight.increment(1.0);
                    let started = std::time::Instant::now();
                    let result = execute(&*device, request, payload).await;
                    op.inflight.decrement(1.0);
                    op.requests.increment(1);
                    op.duration.record(started.elapsed().as_secs_f64());
                    match &result {
                        Ok(_) => op.bytes.increment(request_bytes(&request)),
                        Err(e) => {
                            metrics::counter!("trireme_io_errors_total", "volume" => io_metrics.volume.clone(), "op" => command_name(&request), "kind" => e.errno.name()).increment(1);
                        }
                    }
                    debug!(ok = result.is_ok(), elapsed_us = started.elapsed().as_micros() as u64, "replied");
                    let reply = Reply {
                        handle: h.handle,
                        offset: h.offset,
                        result,
                        _permits: Some((rp, bp)),
                    };
                    // The writer only goes away when the client is gone.
                    let _ = tx.send(reply).await;
                }
                .instrument(span),
            );
        };
        io_metrics.sessions.decrement(1.0);
        drop(tx);
        // Every request already read gets its reply before the socket closes.
        match writer.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!("writing replies stopped: {e}"),
            Err(e) => warn!("reply writer failed: {e}"),
        }
        outcome
    }
}

/// Resolves once the flag is `true`; a flag whose sender is gone can never
/// be raised, so it then pends forever instead of firing.
async fn raised(flag: &mut watch::Receiver<bool>) {
    if flag.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn accept_error_pause(e: io::Error) {
    // Usually EMFILE: back off briefly instead of spinning on accept.
    warn!("accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

fn command_name(r: &Request) -> &'static str {
    match r {
        Request::Read { .. } => "read",
        Request::Write { .. } => "write",
        Request::Disconnect => "disc",
        Request::Flush => "flush",
        Request::Trim { .. } => "trim",
        Request::Cache { .. } => "cache",
        Request::WriteZeroes { .. } => "zero",
    }
}

/// Bytes a request moves or affects, for `trireme_io_bytes_total`.
fn request_bytes(r: &Request) -> u64 {
    match r {
        Request::Read { length, .. }
        | Request::Write { length, .. }
        | Request::Trim { length, .. }
        | Request::Cache { length, .. }
        | Request::WriteZeroes { length, .. } => u64::from(*length),
        Request::Flush | Request::Disconnect => 0,
    }
}

/// The I/O series of one operation on one export.
struct OpMetrics {
    requests: metrics::Counter,
    bytes: metrics::Counter,
    duration: metrics::Histogram,
    inflight: metrics::Gauge,
}

/// Per-session handles to the export's I/O series, made once per session
/// so a request costs no label lookup.
struct IoMetrics {
    volume: String,
    sessions: metrics::Gauge,
    /// read, write, flush, trim, zero, cache.
    ops: [OpMetrics; 6],
}

impl IoMetrics {
    const OPS: [&'static str; 6] = ["read", "write", "flush", "trim", "zero", "cache"];

    fn new(volume: &str) -> IoMetrics {
        let ops = Self::OPS.map(|op| OpMetrics {
            requests: metrics::counter!("trireme_io_requests_total", "volume" => volume.to_string(), "op" => op),
            bytes: metrics::counter!("trireme_io_bytes_total", "volume" => volume.to_string(), "op" => op),
            duration: metrics::histogram!("trireme_io_request_duration_seconds", "volume" => volume.to_string(), "op" => op),
            inflight: metrics::gauge!("trireme_io_inflight_requests", "volume" => volume.to_string(), "op" => op),
        });
        IoMetrics {
            volume: volume.to_string(),
            sessions: metrics::gauge!("trireme_nbd_sessions", "volume" => volume.to_string()),
            ops,
        }
    }

    fn op(&self, r: &Request) -> &OpMetrics {
        let i = match r {
            Request::Read { .. } => 0,
            Request::Write { .. } => 1,
            Request::Flush | Request::Disconnect => 2,
            Request::Trim { .. } => 3,
            Request::WriteZeroes { .. } => 4,
            Request::Cache { .. } => 5,
        };
        &self.ops[i]
    }
}

async fn execute<D: BlockDevice>(device: &D, request: Request, payload: Bytes) -> Result<Option<Bytes>, DeviceError> {
    // Zero-length requests are "unspecified" in the spec; treat them as no-ops.
    let result = match request {
        Request::Read { length: 0, .. } => Ok(None),
        Request::Read { offset, length } => {
            let data = device.read(offset, length).await?;
            if data.len() != length as usize {
                return Err(DeviceError::new(
                    Errno::Io,
                    format!("device returned {} bytes for a {length}-byte read", data.len()),
                ));
            }
            Ok(Some(data))
        }
        Request::Write { length: 0, .. } => Ok(None),
        Request::Write { offset, fua, .. } => {
            device.write(offset, payload, fua).await?;
            Ok(None)
        }
        Request::Flush => device.flush().await.map(|()| None),
        Request::Trim { length: 0, .. } | Request::WriteZeroes { length: 0, .. } => Ok(None),
        Request::Trim { offset, length, fua } => device.trim(offset, length, fua).await.map(|()| None),
        Request::Cache { offset, length } => device.cache(offset, length).await.map(|()| None),
        Request::WriteZeroes {
            offset,
            length,
            may_trim,
            fast_only,
            fua,
        } => device
            .write_zeroes(offset, length, may_trim, fast_only, fua)
            .await
            .map(|()| None),
        Request::Disconnect => Ok(None),
    };
    if let Err(e) = &result {
        debug!("{} failed: {e}", command_name(&request));
    }
    result
}

/// Reads a WRITE's payload of `len` bytes into a buffer that is never
/// zeroed first: the reads fill it (zeroing 1 MiB payloads that are
/// overwritten at once showed as 2% of the CPU under 1 MiB writes).
async fn read_payload<R: AsyncRead + Unpin>(rd: &mut R, len: usize) -> io::Result<Bytes> {
    let mut buf = BytesMut::with_capacity(len);
    while buf.len() < len {
        let want = (len - buf.len()) as u64;
        if (&mut *rd).take(want).read_buf(&mut buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the connection closed {} bytes into a {len}-byte WRITE payload",
                    buf.len()
                ),
            ));
        }
    }
    Ok(buf.freeze())
}

async fn write_replies<W>(wr: W, mut rx: mpsc::Receiver<Reply>, structured: bool) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut w = BufWriter::with_capacity(256 * 1024, wr);
    let mut head = BytesMut::with_capacity(4096 + 64);
    let mut failed: Option<io::Error> = None;
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(reply) = next.take() {
            if failed.is_none()
                && let Err(e) = write_one(&mut w, &mut head, reply, structured).await
            {
                failed = Some(e);
            }
            // Coalesce whatever is ready into one flush.
            next = rx.try_recv().ok();
        }
        if failed.is_none()
            && let Err(e) = w.flush().await
        {
            failed = Some(e);
        }
        // After a write error the client is gone; keep draining so request
        // tasks never block on a full channel.
    }
    match failed {
        Some(e) => Err(e),
        None => w.shutdown().await,
    }
}

async fn write_one<W: AsyncWrite + Unpin>(
    w: &mut BufWriter<W>,
    head: &mut BytesMut,
    reply: Reply,
    structured: bool,
) -> io::Result<()> {
    head.clear();
    match reply.result {
        Ok(data) => {
            match (&data, structured) {
                (Some(d), true) => {
                    codec::encode_structured_read_header(head, reply.handle, reply.offset, d.len() as u32)
                }
                (None, true) => codec::encode_structured_done(head, reply.handle),
                (_, false) => codec::encode_simple_reply(head, reply.handle, 0),
            }
            w.write_all(head).await?;
            if let Some(d) = data {
                w.write_all(&d).await?;
            }
        }
        Err(e) => {
            if structured {
                codec::encode_structured_error(head, reply.handle, e.errno, &e.message);
            } else {
                codec::encode_simple_reply(head, reply.handle, e.errno.as_u32());
            }
            w.write_all(head).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{RequestHeader, cmd, encode_request_header};
    use crate::{ExportInfo, OpenedExport};
    use bytes::BufMut;

    /// Reads at offset 0 take 200 ms, everything else is instant, so a
    /// pipelining server must answer the later requests first.
    struct SlowAtZero;

    impl BlockDevice for SlowAtZero {
        async fn read(&self, offset: u64, length: u32) -> crate::DeviceResult<Bytes> {
            if offset == 0 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(Bytes::from(vec![offset as u8; length as usize]))
        }
        async fn write(&self, _: u64, _: Bytes, _: bool) -> crate::DeviceResult<()> {
            Ok(())
        }
        async fn write_zeroes(&self, _: u64, _: u32, _: bool, _: bool, _: bool) -> crate::DeviceResult<()> {
            Ok(())
        }
        async fn trim(&self, _: u64, _: u32, _: bool) -> crate::DeviceResult<()> {
            Ok(())
        }
        async fn flush(&self) -> crate::DeviceResult<()> {
            Ok(())
        }
    }

    struct OneExport;
    impl ExportRegistry for OneExport {
        type Device = SlowAtZero;
        fn list(&self) -> Vec<ExportInfo> {
            self.describe("v").into_iter().collect()
        }
        fn describe(&self, name: &str) -> Option<ExportInfo> {
            (name == "v").then(|| ExportInfo {
                name: "v".into(),
                description: String::new(),
                size_bytes: 1 << 20,
            })
        }
        fn open(&self, name: &str) -> Result<OpenedExport<SlowAtZero>, String> {
            let info = self.describe(name).ok_or("no such export")?;
            let (_tx, revoked) = watch::channel(false);
            Ok(OpenedExport {
                info,
                device: Arc::new(SlowAtZero),
                revoked,
            })
        }
    }

    #[tokio::test]
    async fn replies_leave_as_requests_complete_matched_by_handle() {
        // proto.md "Transmission phase": replies need not be in request order.
        let (_stop, shutdown) = watch::channel(false);
        let server = Server::new(Arc::new(OneExport), ServerConfig::default(), shutdown);
        let (mut client, server_end) = tokio::io::duplex(1 << 20);
        let task = tokio::spawn(async move { server.serve_connection(server_end, "test".into()).await });

        let mut greeting = [0u8; 18];
        client.read_exact(&mut greeting).await.unwrap();
        let mut out = BytesMut::new();
        out.put_u32(codec::FLAG_C_FIXED_NEWSTYLE | codec::FLAG_C_NO_ZEROES);
        out.put_u64(codec::IHAVEOPT);
        out.put_u32(opt::EXPORT_NAME);
        out.put_u32(1);
        out.put_u8(b'v');
        client.write_all(&out).await.unwrap();
        let mut export = [0u8; 10];
        client.read_exact(&mut export).await.unwrap();
        assert_eq!(u64::from_be_bytes(export[..8].try_into().unwrap()), 1 << 20);

        let mut reqs = BytesMut::new();
        for (handle, offset) in [(1u64, 0u64), (2, 4096), (3, 8192)] {
            let h = RequestHeader {
                flags: 0,
                command: cmd::READ,
                handle,
                offset,
                length: 16,
            };
            encode_request_header(&mut reqs, &h);
        }
        client.write_all(&reqs).await.unwrap();
        let mut order = Vec::new();
        for _ in 0..3 {
            let mut reply = [0u8; codec::SIMPLE_REPLY_LEN + 16];
            client.read_exact(&mut reply).await.unwrap();
            assert_eq!(&reply[4..8], &[0, 0, 0, 0], "no error");
            let handle = u64::from_be_bytes(reply[8..16].try_into().unwrap());
            let expected_byte = match handle {
                1 => 0u8,
                2 => 4096u64 as u8,
                _ => 8192u64 as u8,
            };
            assert!(
                reply[16..].iter().all(|b| *b == expected_byte),
                "data matches handle {handle}"
            );
            order.push(handle);
        }
        assert_eq!(order.last(), Some(&1), "the slow request is answered last: {order:?}");
        drop(client);
        task.await.unwrap();
    }

    /// A payload that arrives in pieces is read whole, and no further: the
    /// next request's bytes stay in the reader. A connection that ends
    /// inside the payload is an error, never a short write.
    #[tokio::test]
    async fn payloads_read_exactly_their_length() {
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (mut client, server_end) = tokio::io::duplex(4096);
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            for piece in sent.chunks(7_000) {
                client.write_all(piece).await.unwrap();
            }
            client.write_all(b"next").await.unwrap();
            client
        });
        let mut rd = BufReader::new(server_end);
        let got = read_payload(&mut rd, payload.len()).await.unwrap();
        assert_eq!(&got[..], &payload[..]);
        let mut next = [0u8; 4];
        rd.read_exact(&mut next).await.unwrap();
        assert_eq!(&next, b"next");
        drop(writer.await.unwrap());

        let (mut client, server_end) = tokio::io::duplex(4096);
        client.write_all(&payload[..1000]).await.unwrap();
        drop(client);
        let mut rd = BufReader::new(server_end);
        let e = read_payload(&mut rd, 4096).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(
            e.to_string().contains("1000 bytes into a 4096-byte WRITE payload"),
            "{e}"
        );
    }
}
