//! Acceptance: malformed or hostile NBD input never crashes triremed or
//! corrupts data. Each case drives a raw TCP socket, asserts the precise
//! server behaviour required by the NBD spec / the Trireme contract (an
//! option or command error reply with the expected code, or a clean close),
//! and then asserts that the triremed process is still alive and that a
//! fresh real client (qemu-io) can still write and read back a pattern.

use std::collections::HashSet;
use std::io::Write;
use std::net::Shutdown;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use trireme_tests::nbd::{self, Conn, Reply};
use trireme_tests::{Cluster, DEFAULT_VOLUME_SIZE, pattern};

const CLOSE_WITHIN: Duration = Duration::from_secs(10);
const SIZE: u64 = DEFAULT_VOLUME_SIZE;

fn start(name: &str) -> Result<Cluster> {
    Cluster::start(name)
}

/// Expect a simple reply for `handle` with the given error.
fn expect_error(c: &mut Conn, handle: u64, errno: u32, what: &str) -> Result<()> {
    let e = c.simple_reply(handle).with_context(|| format!("reply to {what}"))?;
    ensure!(e == errno, "{what}: error {e}, expected {errno}");
    Ok(())
}

/// The session still works: a READ gets a good reply with its payload.
fn expect_session_usable(c: &mut Conn, handle: u64) -> Result<()> {
    let data = c.pread(handle, 0, 4096).context("follow-up READ on the same session")?;
    ensure!(data.len() == 4096);
    Ok(())
}

#[test]
fn client_flags_with_unknown_bits_close_the_connection() -> Result<()> {
    let cluster = start("bad-client-flags")?;
    let mut c = Conn::connect(cluster.nbd_addr())?;
    let hf = c.read_greeting()?;
    ensure!(
        hf == nbd::FLAG_FIXED_NEWSTYLE | nbd::FLAG_NO_ZEROES,
        "handshake flags {hf:#x}"
    );
    c.send_client_flags(nbd::FLAG_C_FIXED_NEWSTYLE | nbd::FLAG_C_NO_ZEROES | 0xfff0_0000)?;
    // Also queue an option so a server that ignored the flags would answer.
    let _ = c.send_option(nbd::OPT_LIST, &[]);
    c.expect_closed(CLOSE_WITHIN)
        .context("client flags with unknown bits")?;
    cluster.assert_healthy()
}

#[test]
fn bad_option_magic_closes_the_connection() -> Result<()> {
    let cluster = start("bad-opt-magic")?;
    let mut c = Conn::connect(cluster.nbd_addr())?;
    c.greet()?;
    let mut b = Vec::new();
    b.extend_from_slice(b"IHAVEOPX");
    b.extend_from_slice(&nbd::OPT_LIST.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes());
    c.send(&b)?;
    c.expect_closed(CLOSE_WITHIN).context("bad option magic")?;
    cluster.assert_healthy()
}

#[test]
fn unknown_option_gets_err_unsup_and_go_still_works() -> Result<()> {
    let cluster = start("unknown-option")?;
    let mut c = Conn::connect(cluster.nbd_addr())?;
    c.greet()?;
    c.send_option(0x4242, b"some option payload")?;
    let r = c.read_option_reply()?;
    ensure!(r.option == 0x4242, "reply names option {}", r.option);
    ensure!(
        r.reply_type == nbd::REP_ERR_UNSUP,
        "reply type {:#x}, expected ERR_UNSUP",
        r.reply_type
    );

    let info = c
        .go(cluster.volume())?
        .map_err(|r| anyhow!("GO after unknown option refused: {r:?}"))?;
    ensure!(info.size == SIZE, "size {}", info.size);
    let want = nbd::TF_HAS_FLAGS
        | nbd::TF_SEND_FLUSH
        | nbd::TF_SEND_FUA
        | nbd::TF_SEND_TRIM
        | nbd::TF_SEND_WRITE_ZEROES
        | nbd::TF_SEND_CACHE
        | nbd::TF_SEND_FAST_ZERO
        | nbd::TF_CAN_MULTI_CONN;
    ensure!(
        info.flags & want == want,
        "transmission flags {:#x} lack some of {want:#x}",
        info.flags
    );
    ensure!(
        info.flags & nbd::TF_READ_ONLY == 0,
        "export is read-only: {:#x}",
        info.flags
    );
    ensure!(
        info.block_sizes == Some((1, 4096, 32 << 20)),
        "block sizes {:?}, expected (1, 4096, 32 MiB)",
        info.block_sizes
    );
    expect_session_usable(&mut c, 1)?;
    c.disconnect()?;
    cluster.assert_healthy()
}

#[test]
fn go_on_unknown_export_gets_err_unknown() -> Result<()> {
    let cluster = start("unknown-export")?;
    let mut c = Conn::connect(cluster.nbd_addr())?;
    c.greet()?;
    match c.go("no-such-volume")? {
        Ok(info) => bail!("GO on an unknown export succeeded: {info:?}"),
        Err(r) => ensure!(
            r.reply_type == nbd::REP_ERR_UNKNOWN,
            "GO reply {:#x}, expected ERR_UNKNOWN",
            r.reply_type
        ),
    }
    match c.go_with(nbd::OPT_INFO, "no-such-volume", &[])? {
        Ok(info) => bail!("INFO on an unknown export succeeded: {info:?}"),
        Err(r) => {
            ensure!(
                r.reply_type == nbd::REP_ERR_UNKNOWN,
                "INFO reply {:#x}, expected ERR_UNKNOWN",
                r.reply_type
            )
        }
    }
    // Option haggling continues after an error reply.
    let info = c
        .go(cluster.volume())?
        .map_err(|r| anyhow!("GO vol0 after ERR_UNKNOWN refused: {r:?}"))?;
    ensure!(info.size == SIZE);
    expect_session_usable(&mut c, 1)?;
    cluster.assert_healthy()
}

#[test]
fn bad_request_magic_closes_the_connection() -> Result<()> {
    let cluster = start("bad-req-magic")?;
    let (mut c, _) = nbd::open(cluster.nbd_addr(), cluster.volume())?;
    let mut req = nbd::encode_request(0, nbd::CMD_READ, 1, 0, 4096);
    req[..4].copy_from_slice(&0xdead_beefu32.to_be_bytes());
    c.send(&req)?;
    c.expect_closed(CLOSE_WITHIN).context("bad request magic")?;
    cluster.assert_healthy()
}

#[test]
fn read_and_trim_past_the_end_get_einval() -> Result<()> {
    let cluster = start("read-past-end")?;
    let (mut c, _) = nbd::open(cluster.nbd_addr(), cluster.volume())?;
    c.request(0, nbd::CMD_READ, 1, SIZE - 2048, 4096)?;
    expect_error(&mut c, 1, nbd::EINVAL, "READ straddling the end")?;
    c.request(0, nbd::CMD_READ, 2, SIZE, 1)?;
    expect_error(&mut c, 2, nbd::EINVAL, "READ at the end")?;
    c.request(0, nbd::CMD_READ, 3, u64::MAX - 100, 4096)?;
    expect_error(&mut c, 3, nbd::EINVAL, "READ with offset+len overflowing u64")?;
    c.request(0, nbd::CMD_TRIM, 4, SIZE - 4096, 8192)?;
    expect_error(&mut c, 4, nbd::EINVAL, "TRIM past the end")?;
    expect_session_usable(&mut c, 5)?;
    // the very last byte is still readable
    let last = c.pread(6, SIZE - 1, 1)?;
    ensure!(last.len() == 1);
    cluster.assert_healthy()
}

#[test]
fn write_past_the_end_gets_enospc_and_session_continues() -> Result<()> {
    let cluster = start("write-past-end")?;
    let (mut c, _) = nbd::open(cluster.nbd_addr(), cluster.volume())?;
    // Known content in the last block first.
    let before = pattern(7, 1, 4096);
    c.pwrite(1, SIZE - 4096, &before, 0)?;

    let mut req = nbd::encode_request(0, nbd::CMD_WRITE, 2, SIZE - 2048, 4096);
    req.extend_from_slice(&pattern(7, 2, 4096));
    c.send(&req)?;
    expect_error(&mut c, 2, nbd::ENOSPC, "WRITE straddling the end")?;
    // The payload was consumed: the next request is parsed correctly.
    let got = c.pread(3, SIZE - 4096, 4096).context("READ after the refused WRITE")?;
    ensure!(got == before, "the refused WRITE modified the last block");

    c.request(0, nbd::CMD_WRITE_ZEROES, 4, SIZE - 2048, 4096)?;
    expect_error(&mut c, 4, nbd::ENOSPC, "WRITE_ZEROES straddling the end")?;
    let got = c.pread(5, SIZE - 4096, 4096)?;
    ensure!(got == before, "the refused WRITE_ZEROES modified the last block");
    cluster.assert_healthy()
}

#[test]
fn read_of_64_mib_gets_einval_and_session_continues() -> Result<()> {
    let cluster = start("read-64m")?;
    let (mut c, _) = nbd::open(cluster.nbd_addr(), cluster.volume())?;
    c.request(0, nbd::CMD_READ, 1, 0, 64 << 20)?;
    expect_error(&mut c, 1, nbd::EINVAL, "READ of 64 MiB")?;
    expect_session_usable(&mut c, 2)?;
    // exactly the advertised maximum is fine
    let data = c.pread(3, 0, 32 << 20)?;
    ensure!(data.len() == 32 << 20);
    cluster.assert_healthy()
}

#[test]
fn write_of_64_mib_gets_einval_then_close() -> Result<()> {
    let cluster = start("write-64m")?;
    let (mut c, _) = nbd::open(cluster.nbd_addr(), cluster.volume())?;
    // Header only: the server must not try to swallow 64 MiB.
    c.request(0, nbd::CMD_WRITE, 1, 0, 64 << 20)?;
    expect_error(&mut c, 1, nbd::EINVAL, "WRITE of 64 MiB")?;
    c.expect_closed(CLOSE_WITHIN).context("after the oversized WRITE")?;
    cluster.assert_healthy()
}

#[test]
fn truncated_request_header_then_close() -> Result<()> {
    let cluster = start("truncated-header")?;
    let (mut c, _) = nbd::open(cluster.nbd_addr(), cluster.volume())?;
    let req = nbd::encode_request(0, nbd::CMD_WRITE, 1, 0, 4096);
    c.send(&req[..13])?;
    c.stream.shutdown(Shutdown::Write)?;
    // The server sees EOF mid-header and closes its side without replying.
    c.expect_closed(CLOSE_WITHIN).context("after a truncated header")?;
    drop(c);
    cluster.assert_healthy()
}

#[test]
fn disconnect_mid_write_payload_discards_the_write() -> Result<()> {
    const OFF: u64 = 64 << 20;
    const LEN: usize = 256 << 10;
    let cluster = start("mid-write")?;
    let old = pattern(11, 1, LEN);
    {
        let (mut c, _) = nbd::open(cluster.nbd_addr(), cluster.volume())?;
        c.pwrite(1, OFF, &old, nbd::CMD_FLAG_FUA)?;
        c.flush(2)?;
        c.disconnect()?;
    }
    {
        let (mut c, _) = nbd::open(cluster.nbd_addr(), cluster.volume())?;
        let new = pattern(11, 2, LEN);
        let mut req = nbd::encode_request(0, nbd::CMD_WRITE, 1, OFF, LEN as u32);
        // a bit more than half, not block aligned
        req.extend_from_slice(&new[..LEN / 2 + 1000]);
        c.send(&req)?;
        c.stream.shutdown(Shutdown::Write)?;
        // Once the server has closed its side it has seen the EOF.
        c.expect_closed(CLOSE_WITHIN)
            .context("after disconnecting mid-payload")?;
    }
    let (mut c, _) = nbd::open(cluster.nbd_addr(), cluster.volume())?;
    let got = c.pread(1, OFF, LEN as u32)?;
    if got != old {
        let first = got.iter().zip(&old).position(|(a, b)| a != b).unwrap_or(0);
        bail!("the abandoned WRITE changed the target range (first differing byte at +{first})");
    }
    cluster.assert_healthy()
}

#[test]
fn unknown_command_and_unknown_flag_get_einval() -> Result<()> {
    let cluster = start("unknown-cmd")?;
    let (mut c, _) = nbd::open(cluster.nbd_addr(), cluster.volume())?;
    c.request(0, 99, 1, 0, 0)?;
    expect_error(&mut c, 1, nbd::EINVAL, "unknown command 99")?;
    c.request(1 << 12, nbd::CMD_READ, 2, 0, 4096)?;
    expect_error(&mut c, 2, nbd::EINVAL, "READ with unknown flag bit 12")?;
    expect_session_usable(&mut c, 3)?;
    // CACHE and FLUSH are accepted
    c.request(0, nbd::CMD_CACHE, 4, 0, 65536)?;
    expect_error(&mut c, 4, 0, "CACHE")?;
    c.flush(5)?;
    cluster.assert_healthy()
}

#[test]
fn pipelined_requests_all_get_exactly_one_reply() -> Result<()> {
    const N: u64 = 64;
    const READ_BASE: u64 = 2 << 20;
    const WRITE_BASE: u64 = 8 << 20;
    let cluster = start("pipelining")?;
    let (mut c, _) = nbd::open(cluster.nbd_addr(), cluster.volume())?;
    // Known content for the blocks the pipeline reads.
    for i in 0..N / 2 {
        c.pwrite(1000 + i, READ_BASE + i * 4096, &pattern(21, i, 4096), 0)?;
    }
    // 64 requests back to back: even handles READ region R, odd handles
    // WRITE region W (disjoint, so ordering does not matter).
    let mut buf = Vec::new();
    for h in 0..N {
        let block = h / 2;
        if h % 2 == 0 {
            buf.extend_from_slice(&nbd::encode_request(
                0,
                nbd::CMD_READ,
                h,
                READ_BASE + block * 4096,
                4096,
            ));
        } else {
            buf.extend_from_slice(&nbd::encode_request(
                0,
                nbd::CMD_WRITE,
                h,
                WRITE_BASE + block * 4096,
                4096,
            ));
            buf.extend_from_slice(&pattern(22, block, 4096));
        }
    }
    // Send from another thread so neither side can deadlock on full buffers.
    let mut tx = c.stream.try_clone()?;
    let sender = thread::spawn(move || tx.write_all(&buf));
    let mut seen = HashSet::new();
    for _ in 0..N {
        let (error, handle) = match c.read_reply()? {
            Reply::Simple { error, handle } => (error, handle),
            r => bail!("unexpected structured reply without negotiation: {r:?}"),
        };
        ensure!(handle < N, "reply for unknown handle {handle}");
        ensure!(seen.insert(handle), "second reply for handle {handle}");
        ensure!(error == 0, "request {handle} failed with {error}");
        if handle % 2 == 0 {
            let data = c.read_exact_vec(4096)?;
            ensure!(
                data == pattern(21, handle / 2, 4096),
                "READ {handle} returned wrong data"
            );
        }
    }
    ensure!(
        seen.len() == N as usize,
        "got {} distinct replies, expected {N}",
        seen.len()
    );
    sender.join().map_err(|_| anyhow!("sender thread panicked"))??;
    for i in 0..N / 2 {
        let got = c.pread(2000 + i, WRITE_BASE + i * 4096, 4096)?;
        ensure!(got == pattern(22, i, 4096), "pipelined WRITE of block {i} not readable");
    }
    cluster.assert_healthy()
}

#[test]
fn structured_read_returns_offset_data_with_done() -> Result<()> {
    const OFF: u64 = 5 << 20;
    let cluster = start("structured")?;
    let data = pattern(31, 0, 4096);
    {
        let (mut c, _) = nbd::open(cluster.nbd_addr(), cluster.volume())?;
        c.pwrite(1, OFF, &data, 0)?;
    }
    let (mut c, _) = nbd::open_structured(cluster.nbd_addr(), cluster.volume())?;
    c.request(0, nbd::CMD_READ, 42, OFF, 4096)?;
    let mut assembled = vec![None::<u8>; 4096];
    let mut offset_data_chunks = 0;
    loop {
        let (flags, typ, handle, payload) = match c.read_reply()? {
            Reply::Chunk {
                flags,
                typ,
                handle,
                payload,
            } => (flags, typ, handle, payload),
            r => bail!("simple reply to READ after STRUCTURED_REPLY was negotiated: {r:?}"),
        };
        ensure!(handle == 42, "chunk for handle {handle}");
        match typ {
            nbd::REPLY_TYPE_OFFSET_DATA => {
                ensure!(payload.len() > 8, "short OFFSET_DATA chunk");
                let off = u64::from_be_bytes(payload[..8].try_into()?);
                ensure!(
                    off >= OFF && off + (payload.len() as u64 - 8) <= OFF + 4096,
                    "chunk offset {off} out of range"
                );
                for (i, b) in payload[8..].iter().enumerate() {
                    assembled[(off - OFF) as usize + i] = Some(*b);
                }
                offset_data_chunks += 1;
            }
            nbd::REPLY_TYPE_NONE => {
                ensure!(
                    flags & nbd::REPLY_FLAG_DONE != 0 && payload.is_empty(),
                    "NONE chunk without DONE"
                );
            }
            t => bail!("unexpected chunk type {t:#x} for a READ of written data"),
        }
        if flags & nbd::REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    ensure!(offset_data_chunks >= 1, "no OFFSET_DATA chunk");
    let got: Vec<u8> = assembled
        .iter()
        .map(|b| b.ok_or_else(|| anyhow!("byte not covered")))
        .collect::<Result<_>>()?;
    ensure!(got == data, "structured READ returned wrong data");

    // An invalid READ gets a structured ERROR chunk (never a simple reply).
    c.request(0, nbd::CMD_READ, 43, SIZE - 2048, 4096)?;
    match c.read_reply()? {
        Reply::Chunk {
            flags,
            typ,
            handle,
            payload,
        } => {
            ensure!(handle == 43, "chunk for handle {handle}");
            ensure!(
                typ == nbd::REPLY_TYPE_ERROR || typ == nbd::REPLY_TYPE_ERROR_OFFSET,
                "chunk type {typ:#x}, expected an error chunk"
            );
            ensure!(payload.len() >= 6, "short error chunk");
            let err = u32::from_be_bytes(payload[..4].try_into()?);
            ensure!(err == nbd::EINVAL, "error chunk with {err}, expected EINVAL");
            if flags & nbd::REPLY_FLAG_DONE == 0 {
                // drain to the DONE chunk
                loop {
                    match c.read_reply()? {
                        Reply::Chunk { flags, handle: 43, .. } if flags & nbd::REPLY_FLAG_DONE != 0 => break,
                        Reply::Chunk { handle: 43, .. } => {}
                        r => bail!("unexpected reply {r:?}"),
                    }
                }
            }
        }
        r => bail!("simple reply to a READ with structured replies negotiated: {r:?}"),
    }
    cluster.assert_healthy()
}
