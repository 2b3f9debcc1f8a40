//! The NBD wire format as pure functions over byte slices: no sockets, no
//! async. Parsers return `Ok(None)` ("incomplete") until a frame is whole, so
//! the same code serves a tokio server, a fuzzer and a simulator.
//!
//! Section names in comments refer to NetworkBlockDevice/nbd `doc/proto.md`.

use bytes::{BufMut, BytesMut};

/// "NBDMAGIC": first eight bytes the server sends (proto.md "Newstyle negotiation").
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle magic, also the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server, 16 bits).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags (32 bits).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags (proto.md "Transmission flags").
pub mod tflag {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option numbers (proto.md "Option types").
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const PEEK_EXPORT: u32 = 4;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (proto.md "Option reply types").
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const ERR_UNSUP: u32 = (1 << 31) + 1;
    pub const ERR_POLICY: u32 = (1 << 31) + 2;
    pub const ERR_INVALID: u32 = (1 << 31) + 3;
    pub const ERR_PLATFORM: u32 = (1 << 31) + 4;
    pub const ERR_TLS_REQD: u32 = (1 << 31) + 5;
    pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
    pub const ERR_SHUTDOWN: u32 = (1 << 31) + 7;
    pub const ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
    pub const ERR_TOO_BIG: u32 = (1 << 31) + 9;
}

/// Information types of NBD_OPT_INFO / NBD_OPT_GO.
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command numbers (proto.md "Request types").
pub mod cmd {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;
    pub const FLUSH: u16 = 3;
    pub const TRIM: u16 = 4;
    pub const CACHE: u16 = 5;
    pub const WRITE_ZEROES: u16 = 6;
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags (proto.md "Command flags").
pub mod cmd_flag {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk types and flags.
pub mod chunk {
    pub const FLAG_DONE: u16 = 1 << 0;
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const ERROR: u16 = (1 << 15) + 1;
}

/// Byte lengths of the fixed-size frames.
pub const OPTION_HEADER_LEN: usize = 16;
pub const REQUEST_HEADER_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const STRUCTURED_HEADER_LEN: usize = 20;

/// Largest READ/WRITE payload we accept: 2^25, the size the spec says no
/// server should treat as a denial of service (proto.md "Block size constraints").
pub const MAX_PAYLOAD_BYTES: u32 = 32 * 1024 * 1024;
/// Alignment clients should prefer; smaller requests work but cost a partial
/// page in the page cache.
pub const PREFERRED_BLOCK_BYTES: u32 = 4096;
/// We accept byte-granular requests (the spec's default minimum of 1).
pub const MIN_BLOCK_BYTES: u32 = 1;
/// Longest option payload read into memory; longer ones are skipped with
/// NBD_REP_ERR_TOO_BIG. Export names are at most 4096 bytes (proto.md).
pub const MAX_OPTION_DATA_BYTES: u32 = 64 * 1024;

/// NBD error values (proto.md "Error values"). Only these may go on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Errno {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

impl Errno {
    pub fn as_u32(self) -> u32 {
        self as u32
    }

    /// The lower-case errno name, for metric labels and logs.
    pub fn name(self) -> &'static str {
        match self {
            Errno::Perm => "eperm",
            Errno::Io => "eio",
            Errno::NoMem => "enomem",
            Errno::Inval => "einval",
            Errno::NoSpc => "enospc",
            Errno::Overflow => "eoverflow",
            Errno::NotSup => "enotsup",
            Errno::Shutdown => "eshutdown",
        }
    }
}

/// A frame that breaks the protocol so badly that the connection cannot
/// continue (the spec's "hard disconnect" cases).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad option magic {0:#018x}, expected IHAVEOPT")]
    BadOptionMagic(u64),
    #[error("bad request magic {0:#010x}, expected {REQUEST_MAGIC:#010x}")]
    BadRequestMagic(u32),
    #[error("client flags {0:#x} carry unknown bits")]
    UnknownClientFlags(u32),
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// The server's opening: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn encode_server_greeting(buf: &mut BytesMut) {
    buf.put_u64(NBD_MAGIC);
    buf.put_u64(IHAVEOPT);
    buf.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
}

/// What the client answered to the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

/// proto.md "Client flags": a server MUST close on flags it does not know.
pub fn parse_client_flags(b: &[u8]) -> Result<Option<ClientFlags>, FrameError> {
    if b.len() < 4 {
        return Ok(None);
    }
    let flags = be_u32(b);
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(FrameError::UnknownClientFlags(flags));
    }
    Ok(Some(ClientFlags {
        fixed_newstyle: flags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
    }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

pub fn parse_option_header(b: &[u8]) -> Result<Option<OptionHeader>, FrameError> {
    if b.len() < OPTION_HEADER_LEN {
        return Ok(None);
    }
    let magic = be_u64(b);
    if magic != IHAVEOPT {
        return Err(FrameError::BadOptionMagic(magic));
    }
    Ok(Some(OptionHeader {
        option: be_u32(&b[8..]),
        length: be_u32(&b[12..]),
    }))
}

/// A client option whose data has been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    StartTls,
    Info { name: String, requests: Vec<u16> },
    Go { name: String, requests: Vec<u16> },
    StructuredReply,
    ListMetaContext,
    SetMetaContext,
    ExtendedHeaders,
    Unknown(u32),
}

/// Why an option's data was refused; answered with NBD_REP_ERR_INVALID and
/// the message, and the session continues.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct OptionInvalid(pub String);

fn utf8_name(b: &[u8]) -> Result<String, OptionInvalid> {
    String::from_utf8(b.to_vec()).map_err(|_| OptionInvalid("export name is not valid UTF-8".into()))
}

fn no_data(option: &str, data: &[u8]) -> Result<(), OptionInvalid> {
    if data.is_empty() {
        Ok(())
    } else {
        Err(OptionInvalid(format!(
            "{option} must not carry data, got {} bytes",
            data.len()
        )))
    }
}

/// Parses the data of one option (proto.md "Option types").
pub fn parse_option(option: u32, data: &[u8]) -> Result<ClientOption, OptionInvalid> {
    match option {
        opt::EXPORT_NAME => Ok(ClientOption::ExportName(utf8_name(data)?)),
        // "a server SHOULD ignore any data sent by the client" for ABORT.
        opt::ABORT => Ok(ClientOption::Abort),
        opt::LIST => no_data("NBD_OPT_LIST", data).map(|()| ClientOption::List),
        opt::STARTTLS => no_data("NBD_OPT_STARTTLS", data).map(|()| ClientOption::StartTls),
        opt::INFO | opt::GO => {
            if data.len() < 6 {
                return Err(OptionInvalid(format!(
                    "INFO/GO data is {} bytes, at least 6 are needed",
                    data.len()
                )));
            }
            let name_len = be_u32(data) as usize;
            // "MUST be no larger than the option data length - 6"
            if name_len > data.len() - 6 {
                return Err(OptionInvalid(format!(
                    "export name length {name_len} exceeds option data length {} - 6",
                    data.len()
                )));
            }
            let name = utf8_name(&data[4..4 + name_len])?;
            let rest = &data[4 + name_len..];
            let count = be_u16(rest) as usize;
            let list = &rest[2..];
            if list.len() != count * 2 {
                return Err(OptionInvalid(format!(
                    "{count} information requests announced but {} bytes follow",
                    list.len()
                )));
            }
            let requests = list.chunks_exact(2).map(be_u16).collect();
            if option == opt::INFO {
                Ok(ClientOption::Info { name, requests })
            } else {
                Ok(ClientOption::Go { name, requests })
            }
        }
        opt::STRUCTURED_REPLY => no_data("NBD_OPT_STRUCTURED_REPLY", data).map(|()| ClientOption::StructuredReply),
        opt::LIST_META_CONTEXT => Ok(ClientOption::ListMetaContext),
        opt::SET_META_CONTEXT => Ok(ClientOption::SetMetaContext),
        opt::EXTENDED_HEADERS => Ok(ClientOption::ExtendedHeaders),
        other => Ok(ClientOption::Unknown(other)),
    }
}

pub fn encode_option_reply(buf: &mut BytesMut, option: u32, reply_type: u32, data: &[u8]) {
    buf.put_u64(OPTION_REPLY_MAGIC);
    buf.put_u32(option);
    buf.put_u32(reply_type);
    buf.put_u32(data.len() as u32);
    buf.put_slice(data);
}

/// NBD_REP_SERVER: name length, name, then a human-readable description.
pub fn encode_rep_server(buf: &mut BytesMut, name: &str, description: &str) {
    let mut data = BytesMut::with_capacity(4 + name.len() + description.len());
    data.put_u32(name.len() as u32);
    data.put_slice(name.as_bytes());
    data.put_slice(description.as_bytes());
    encode_option_reply(buf, opt::LIST, rep::SERVER, &data);
}

pub fn encode_info_export(buf: &mut BytesMut, option: u32, size_bytes: u64, flags: u16) {
    let mut data = BytesMut::with_capacity(12);
    data.put_u16(info::EXPORT);
    data.put_u64(size_bytes);
    data.put_u16(flags);
    encode_option_reply(buf, option, rep::INFO, &data);
}

pub fn encode_info_text(buf: &mut BytesMut, option: u32, info_type: u16, text: &str) {
    let mut data = BytesMut::with_capacity(2 + text.len());
    data.put_u16(info_type);
    data.put_slice(text.as_bytes());
    encode_option_reply(buf, option, rep::INFO, &data);
}

pub fn encode_info_block_size(buf: &mut BytesMut, option: u32) {
    let mut data = BytesMut::with_capacity(14);
    data.put_u16(info::BLOCK_SIZE);
    data.put_u32(MIN_BLOCK_BYTES);
    data.put_u32(PREFERRED_BLOCK_BYTES);
    data.put_u32(MAX_PAYLOAD_BYTES);
    encode_option_reply(buf, option, rep::INFO, &data);
}

/// Reply to NBD_OPT_EXPORT_NAME: size, flags, and 124 zero bytes unless the
/// client negotiated NO_ZEROES.
pub fn encode_export_name_reply(buf: &mut BytesMut, size_bytes: u64, flags: u16, no_zeroes: bool) {
    buf.put_u64(size_bytes);
    buf.put_u16(flags);
    if !no_zeroes {
        buf.put_bytes(0, 124);
    }
}

/// A transmission request header, as sent (not yet validated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

pub fn parse_request_header(b: &[u8]) -> Result<Option<RequestHeader>, FrameError> {
    if b.len() < REQUEST_HEADER_LEN {
        return Ok(None);
    }
    let magic = be_u32(b);
    if magic != REQUEST_MAGIC {
        return Err(FrameError::BadRequestMagic(magic));
    }
    Ok(Some(RequestHeader {
        flags: be_u16(&b[4..]),
        command: be_u16(&b[6..]),
        handle: be_u64(&b[8..]),
        offset: be_u64(&b[16..]),
        length: be_u32(&b[24..]),
    }))
}

pub fn encode_request_header(buf: &mut BytesMut, h: &RequestHeader) {
    buf.put_u32(REQUEST_MAGIC);
    buf.put_u16(h.flags);
    buf.put_u16(h.command);
    buf.put_u64(h.handle);
    buf.put_u64(h.offset);
    buf.put_u32(h.length);
}

/// A request that passed every check against the export it was sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Read {
        offset: u64,
        length: u32,
    },
    /// The payload of `length` bytes follows the header on the wire.
    Write {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Disconnect,
    Flush,
    Trim {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Cache {
        offset: u64,
        length: u32,
    },
    WriteZeroes {
        offset: u64,
        length: u32,
        may_trim: bool,
        fast_only: bool,
        fua: bool,
    },
}

/// A request refused with an NBD error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRefused {
    pub errno: Errno,
    pub message: String,
    /// Payload bytes still on the wire for this request, which must be read
    /// and discarded to stay in step with the client.
    pub skip_payload_bytes: u32,
    /// The payload is too long to skip safely: reply, then hard disconnect.
    pub disconnect: bool,
}

impl RequestRefused {
    fn new(errno: Errno, message: String) -> Self {
        RequestRefused {
            errno,
            message,
            skip_payload_bytes: 0,
            disconnect: false,
        }
    }
}

/// What the session negotiated, which decides what requests are legal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    pub export_size_bytes: u64,
    pub structured_replies: bool,
}

/// Checks a request header against the export (proto.md "Request types",
/// "Error values"). WRITE payloads over the maximum cannot be skipped safely
/// and end the session; every other refusal leaves the session usable.
pub fn validate_request(h: &RequestHeader, limits: &SessionLimits) -> Result<Request, RequestRefused> {
    use cmd_flag::*;
    let payload = if h.command == cmd::WRITE { h.length } else { 0 };
    let refuse = |errno: Errno, message: String| {
        let mut r = RequestRefused::new(errno, message);
        if payload > MAX_PAYLOAD_BYTES {
            r.disconnect = true;
        } else {
            r.skip_payload_bytes = payload;
        }
        r
    };
    // FUA is valid on every command once SEND_FUA is advertised (we always do).
    let allowed = match h.command {
        cmd::READ | cmd::WRITE | cmd::DISC | cmd::FLUSH | cmd::TRIM | cmd::CACHE => FUA,
        cmd::WRITE_ZEROES => FUA | NO_HOLE | FAST_ZERO,
        other => {
            return Err(refuse(Errno::Inval, format!("unknown command {other}")));
        }
    };
    if h.flags & !allowed != 0 {
        return Err(refuse(
            Errno::Inval,
            format!(
                "command flags {:#x} not valid for command {}",
                h.flags & !allowed,
                h.command
            ),
        ));
    }
    if h.command == cmd::WRITE && h.length > MAX_PAYLOAD_BYTES {
        return Err(refuse(
            Errno::Inval,
            format!(
                "write length {} exceeds the maximum payload {MAX_PAYLOAD_BYTES}",
                h.length
            ),
        ));
    }
    if h.command == cmd::READ && h.length > MAX_PAYLOAD_BYTES {
        return Err(refuse(
            Errno::Inval,
            format!(
                "read length {} exceeds the maximum payload {MAX_PAYLOAD_BYTES}",
                h.length
            ),
        ));
    }
    let ranged = matches!(
        h.command,
        cmd::READ | cmd::WRITE | cmd::TRIM | cmd::CACHE | cmd::WRITE_ZEROES
    );
    if ranged {
        let end = h.offset.checked_add(u64::from(h.length));
        if end.is_none_or(|e| e > limits.export_size_bytes) {
            // Writes past the end are ENOSPC, reads and trims EINVAL (proto.md "Error values").
            let errno = if matches!(h.command, cmd::WRITE | cmd::WRITE_ZEROES) {
                Errno::NoSpc
            } else {
                Errno::Inval
            };
            return Err(refuse(
                errno,
                format!(
                    "range offset {} length {} goes past the export size {}",
                    h.offset, h.length, limits.export_size_bytes
                ),
            ));
        }
    }
    let fua = h.flags & FUA != 0;
    Ok(match h.command {
        cmd::READ => Request::Read {
            offset: h.offset,
            length: h.length,
        },
        cmd::WRITE => Request::Write {
            offset: h.offset,
            length: h.length,
            fua,
        },
        cmd::DISC => Request::Disconnect,
        cmd::FLUSH => Request::Flush,
        cmd::TRIM => Request::Trim {
            offset: h.offset,
            length: h.length,
            fua,
        },
        cmd::CACHE => Request::Cache {
            offset: h.offset,
            length: h.length,
        },
        _ => Request::WriteZeroes {
            offset: h.offset,
            length: h.length,
            may_trim: h.flags & NO_HOLE == 0,
            fast_only: h.flags & FAST_ZERO != 0,
            fua,
        },
    })
}

/// A simple reply header; for a successful READ the data follows it.
pub fn encode_simple_reply(buf: &mut BytesMut, handle: u64, error: u32) {
    buf.put_u32(SIMPLE_REPLY_MAGIC);
    buf.put_u32(error);
    buf.put_u64(handle);
}

fn encode_chunk_header(buf: &mut BytesMut, flags: u16, chunk_type: u16, handle: u64, length: u32) {
    buf.put_u32(STRUCTURED_REPLY_MAGIC);
    buf.put_u16(flags);
    buf.put_u16(chunk_type);
    buf.put_u64(handle);
    buf.put_u32(length);
}

/// NBD_REPLY_TYPE_NONE with DONE: success of a command without data.
pub fn encode_structured_done(buf: &mut BytesMut, handle: u64) {
    encode_chunk_header(buf, chunk::FLAG_DONE, chunk::NONE, handle, 0);
}

/// Header of a final NBD_REPLY_TYPE_OFFSET_DATA chunk; `data_len` bytes of
/// data follow it on the wire.
pub fn encode_structured_read_header(buf: &mut BytesMut, handle: u64, offset: u64, data_len: u32) {
    encode_chunk_header(buf, chunk::FLAG_DONE, chunk::OFFSET_DATA, handle, 8 + data_len);
    buf.put_u64(offset);
}

/// A final NBD_REPLY_TYPE_ERROR chunk with a human-readable message.
pub fn encode_structured_error(buf: &mut BytesMut, handle: u64, errno: Errno, message: &str) {
    // The message is bounded so a chunk can never approach the payload limit.
    let msg = &message.as_bytes()[..message.len().min(4096)];
    encode_chunk_header(buf, chunk::FLAG_DONE, chunk::ERROR, handle, 6 + msg.len() as u32);
    buf.put_u32(errno.as_u32());
    buf.put_u16(msg.len() as u16);
    buf.put_slice(msg);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(command: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            handle: 7,
            offset,
            length,
        }
    }
    const LIMITS: SessionLimits = SessionLimits {
        export_size_bytes: 1 << 20,
        structured_replies: false,
    };

    #[test]
    fn greeting_is_nbdmagic_ihaveopt_and_fixed_newstyle_no_zeroes() {
        let mut b = BytesMut::new();
        encode_server_greeting(&mut b);
        assert_eq!(&b[..8], b"NBDMAGIC");
        assert_eq!(&b[8..16], b"IHAVEOPT");
        assert_eq!(&b[16..18], &[0, 3]);
    }

    #[test]
    fn client_flags_with_unknown_bits_are_refused() {
        // proto.md "Client flags": the server MUST close on unknown flags.
        assert_eq!(
            parse_client_flags(&[0, 0, 0, 4]),
            Err(FrameError::UnknownClientFlags(4))
        );
        assert_eq!(
            parse_client_flags(&[0, 0, 0, 3]),
            Ok(Some(ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true
            }))
        );
        assert_eq!(parse_client_flags(&[0, 0, 0]), Ok(None));
    }

    #[test]
    fn option_header_needs_ihaveopt() {
        let mut b = BytesMut::new();
        b.put_u64(IHAVEOPT);
        b.put_u32(opt::GO);
        b.put_u32(9);
        assert_eq!(
            parse_option_header(&b),
            Ok(Some(OptionHeader {
                option: opt::GO,
                length: 9
            }))
        );
        assert_eq!(parse_option_header(&b[..15]), Ok(None));
        b[0] = 0;
        assert!(matches!(parse_option_header(&b), Err(FrameError::BadOptionMagic(_))));
    }

    fn go_data(name: &str, requests: &[u16]) -> Vec<u8> {
        let mut d = BytesMut::new();
        d.put_u32(name.len() as u32);
        d.put_slice(name.as_bytes());
        d.put_u16(requests.len() as u16);
        for r in requests {
            d.put_u16(*r);
        }
        d.to_vec()
    }

    #[test]
    fn go_parses_name_and_information_requests() {
        let d = go_data("vol0", &[info::NAME, info::BLOCK_SIZE]);
        assert_eq!(
            parse_option(opt::GO, &d),
            Ok(ClientOption::Go {
                name: "vol0".into(),
                requests: vec![1, 3]
            })
        );
    }

    #[test]
    fn go_name_length_beyond_data_minus_6_is_invalid() {
        // proto.md NBD_OPT_GO: name length "MUST be no larger than the option data length - 6".
        let mut d = go_data("vol0", &[]);
        d[3] = 5;
        assert!(parse_option(opt::GO, &d).is_err());
        assert!(parse_option(opt::INFO, &[0, 0, 0]).is_err());
        let mut d = go_data("vol0", &[1]);
        d.pop();
        assert!(parse_option(opt::GO, &d).is_err());
    }

    #[test]
    fn list_and_structured_reply_refuse_data() {
        assert!(parse_option(opt::LIST, b"x").is_err());
        assert!(parse_option(opt::STRUCTURED_REPLY, b"x").is_err());
        assert_eq!(parse_option(opt::LIST, b""), Ok(ClientOption::List));
        // ABORT: "a server SHOULD ignore any data sent by the client".
        assert_eq!(parse_option(opt::ABORT, b"junk"), Ok(ClientOption::Abort));
        assert_eq!(parse_option(99, b""), Ok(ClientOption::Unknown(99)));
    }

    #[test]
    fn request_header_round_trips_and_bad_magic_is_refused() {
        let h = header(cmd::WRITE, cmd_flag::FUA, 4096, 512);
        let mut b = BytesMut::new();
        encode_request_header(&mut b, &h);
        assert_eq!(b.len(), REQUEST_HEADER_LEN);
        assert_eq!(parse_request_header(&b), Ok(Some(h)));
        assert_eq!(parse_request_header(&b[..27]), Ok(None));
        b[0] ^= 1;
        assert!(matches!(parse_request_header(&b), Err(FrameError::BadRequestMagic(_))));
    }

    #[test]
    fn read_past_the_end_is_einval_and_write_past_the_end_is_enospc() {
        // proto.md "Error values": ENOSPC for writes beyond the end, EINVAL for reads and trims.
        let r = validate_request(&header(cmd::READ, 0, (1 << 20) - 10, 20), &LIMITS).unwrap_err();
        assert_eq!(r.errno, Errno::Inval);
        let w = validate_request(&header(cmd::WRITE, 0, (1 << 20) - 10, 20), &LIMITS).unwrap_err();
        assert_eq!((w.errno, w.skip_payload_bytes, w.disconnect), (Errno::NoSpc, 20, false));
        let z = validate_request(&header(cmd::WRITE_ZEROES, 0, 1 << 20, 1), &LIMITS).unwrap_err();
        assert_eq!(z.errno, Errno::NoSpc);
        let t = validate_request(&header(cmd::TRIM, 0, u64::MAX, 1), &LIMITS).unwrap_err();
        assert_eq!(t.errno, Errno::Inval);
    }

    #[test]
    fn the_last_byte_of_the_export_is_addressable() {
        let r = validate_request(&header(cmd::READ, 0, (1 << 20) - 1, 1), &LIMITS);
        assert_eq!(
            r,
            Ok(Request::Read {
                offset: (1 << 20) - 1,
                length: 1
            })
        );
    }

    #[test]
    fn oversize_write_disconnects_and_oversize_read_does_not() {
        let big = MAX_PAYLOAD_BYTES + 1;
        let limits = SessionLimits {
            export_size_bytes: 1 << 40,
            structured_replies: false,
        };
        let w = validate_request(&header(cmd::WRITE, 0, 0, big), &limits).unwrap_err();
        assert!(w.disconnect);
        let r = validate_request(&header(cmd::READ, 0, 0, big), &limits).unwrap_err();
        assert!(!r.disconnect);
        assert_eq!(r.errno, Errno::Inval);
        // TRIM and WRITE_ZEROES carry no payload, so a large effect length is fine.
        assert!(validate_request(&header(cmd::TRIM, 0, 0, big), &limits).is_ok());
    }

    #[test]
    fn unknown_commands_and_flags_are_einval() {
        // proto.md: "SHOULD return NBD_EINVAL if it receives an unknown command" / "unknown command flag".
        assert_eq!(
            validate_request(&header(42, 0, 0, 0), &LIMITS).unwrap_err().errno,
            Errno::Inval
        );
        assert_eq!(
            validate_request(&header(cmd::BLOCK_STATUS, 0, 0, 0), &LIMITS)
                .unwrap_err()
                .errno,
            Errno::Inval
        );
        let e = validate_request(&header(cmd::READ, cmd_flag::NO_HOLE, 0, 1), &LIMITS).unwrap_err();
        assert_eq!(e.errno, Errno::Inval);
        let e = validate_request(&header(cmd::WRITE, 1 << 9, 0, 16), &LIMITS).unwrap_err();
        assert_eq!(
            e.skip_payload_bytes, 16,
            "a refused write's payload must still be consumed"
        );
        // FUA is valid on every command once SEND_FUA is negotiated.
        assert_eq!(
            validate_request(&header(cmd::FLUSH, cmd_flag::FUA, 0, 0), &LIMITS),
            Ok(Request::Flush)
        );
    }

    #[test]
    fn write_zeroes_flags_map_to_may_trim_and_fast_only() {
        let f = cmd_flag::NO_HOLE | cmd_flag::FAST_ZERO;
        assert_eq!(
            validate_request(&header(cmd::WRITE_ZEROES, f, 0, 4096), &LIMITS),
            Ok(Request::WriteZeroes {
                offset: 0,
                length: 4096,
                may_trim: false,
                fast_only: true,
                fua: false
            })
        );
    }

    #[test]
    fn structured_error_chunk_layout() {
        let mut b = BytesMut::new();
        encode_structured_error(&mut b, 9, Errno::Inval, "bad");
        assert_eq!(be_u32(&b), STRUCTURED_REPLY_MAGIC);
        assert_eq!(be_u16(&b[4..]), chunk::FLAG_DONE);
        assert_eq!(be_u16(&b[6..]), chunk::ERROR);
        assert_eq!(be_u64(&b[8..]), 9);
        assert_eq!(be_u32(&b[16..]), 9);
        assert_eq!(be_u32(&b[20..]), 22);
        assert_eq!(&b[26..], b"bad");
    }

    /// Hostile input: every parser of the handshake and of requests, fed
    /// arbitrary and nearly-valid bytes, must never panic, and what it
    /// accepts must be within the limits it enforces.
    /// `PROPTEST_CASES=100000 cargo test -p trireme-nbd --lib fuzz` runs them longer.
    mod fuzz {
        use super::*;

        /// `default` cases, or `PROPTEST_CASES` for a long run.
        fn cases(default: u32) -> ProptestConfig {
            let n = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok());
            ProptestConfig::with_cases(n.unwrap_or(default))
        }

        /// Values near the limits the validator checks against.
        fn edge_u64() -> impl Strategy<Value = u64> {
            prop_oneof![
                any::<u64>(),
                Just(0u64),
                Just(u64::MAX),
                (0u64..4096).prop_map(|d| u64::MAX - d),
                0u64..(1 << 21),
                (0u64..4096).prop_map(|d| (1u64 << 20).saturating_sub(d)),
            ]
        }

        fn edge_u32() -> impl Strategy<Value = u32> {
            prop_oneof![
                any::<u32>(),
                Just(0u32),
                Just(u32::MAX),
                (0u32..4).prop_map(|d| MAX_PAYLOAD_BYTES - 1 + d),
                0u32..8192,
            ]
        }

        fn header() -> impl Strategy<Value = RequestHeader> {
            (
                prop_oneof![any::<u16>(), 0u16..=31, Just(1u16 << 9)],
                prop_oneof![0u16..=9, any::<u16>()],
                any::<u64>(),
                edge_u64(),
                edge_u32(),
            )
                .prop_map(|(flags, command, handle, offset, length)| RequestHeader {
                    flags,
                    command,
                    handle,
                    offset,
                    length,
                })
        }

        /// Arbitrary bytes, or an encoded header, possibly damaged or cut.
        fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..40),
                (header(), any::<prop::sample::Index>(), any::<u8>(), 0usize..40).prop_map(|(h, at, x, cut)| {
                    let mut b = BytesMut::new();
                    encode_request_header(&mut b, &h);
                    let mut v = b.to_vec();
                    if x % 3 == 0 {
                        let i = at.index(v.len());
                        v[i] ^= x | 1;
                    }
                    if x % 5 == 0 {
                        v.truncate(cut.min(v.len()));
                    }
                    v
                }),
            ]
        }

        fn limits() -> impl Strategy<Value = SessionLimits> {
            (edge_u64(), any::<bool>()).prop_map(|(export_size_bytes, structured_replies)| SessionLimits {
                export_size_bytes,
                structured_replies,
            })
        }

        fn range_of(r: &Request) -> Option<(u64, u32)> {
            match *r {
                Request::Read { offset, length }
                | Request::Write { offset, length, .. }
                | Request::Trim { offset, length, .. }
                | Request::Cache { offset, length }
                | Request::WriteZeroes { offset, length, .. } => Some((offset, length)),
                Request::Disconnect | Request::Flush => None,
            }
        }

        /// Arbitrary option data, or INFO/GO data whose name length and
        /// request count may lie about what follows.
        fn option_data() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..80),
                (
                    prop::collection::vec(any::<u8>(), 0..12),
                    prop_oneof![Just(None), any::<u32>().prop_map(Some), (0u32..16).prop_map(Some)],
                    prop::collection::vec(any::<u16>(), 0..6),
                    prop_oneof![Just(None), any::<u16>().prop_map(Some), (0u16..8).prop_map(Some)],
                    0usize..4,
                )
                    .prop_map(|(name, name_len, reqs, count, cut)| {
                        let mut d = BytesMut::new();
                        d.put_u32(name_len.unwrap_or(name.len() as u32));
                        d.put_slice(&name);
                        d.put_u16(count.unwrap_or(reqs.len() as u16));
                        for r in &reqs {
                            d.put_u16(*r);
                        }
                        let mut v = d.to_vec();
                        v.truncate(v.len().saturating_sub(cut));
                        v
                    }),
            ]
        }

        proptest! {
            #![proptest_config(cases(512))]

            #[test]
            fn fuzz_request_header_parse_and_validate(bytes in header_bytes(), limits in limits()) {
                let parsed = parse_request_header(&bytes);
                match parsed {
                    Ok(None) => prop_assert!(bytes.len() < REQUEST_HEADER_LEN),
                    Err(FrameError::BadRequestMagic(m)) => {
                        prop_assert!(bytes.len() >= REQUEST_HEADER_LEN && m != REQUEST_MAGIC);
                    }
                    Err(e) => prop_assert!(false, "unexpected frame error {e}"),
                    Ok(Some(h)) => {
                        // What was parsed is exactly the first 28 bytes.
                        let mut again = BytesMut::new();
                        encode_request_header(&mut again, &h);
                        prop_assert_eq!(&again[..], &bytes[..REQUEST_HEADER_LEN]);
                        match validate_request(&h, &limits) {
                            Ok(r) => {
                                if let Some((offset, length)) = range_of(&r) {
                                    let end = offset.checked_add(u64::from(length));
                                    prop_assert!(end.is_some_and(|e| e <= limits.export_size_bytes),
                                        "accepted {:?} past the export size {}", r, limits.export_size_bytes);
                                }
                                if let Request::Read { length, .. } | Request::Write { length, .. } = r {
                                    prop_assert!(length <= MAX_PAYLOAD_BYTES);
                                }
                                let allowed = if h.command == cmd::WRITE_ZEROES {
                                    cmd_flag::FUA | cmd_flag::NO_HOLE | cmd_flag::FAST_ZERO
                                } else {
                                    cmd_flag::FUA
                                };
                                prop_assert_eq!(h.flags & !allowed, 0, "unknown flags accepted");
                                prop_assert!(h.command <= cmd::WRITE_ZEROES);
                            }
                            Err(refused) => {
                                // A refused WRITE's payload is still on the wire: it is
                                // skipped exactly, or the session ends when it is too big.
                                let payload = if h.command == cmd::WRITE { h.length } else { 0 };
                                if payload > MAX_PAYLOAD_BYTES {
                                    prop_assert!(refused.disconnect && refused.skip_payload_bytes == 0);
                                } else {
                                    prop_assert!(!refused.disconnect);
                                    prop_assert_eq!(refused.skip_payload_bytes, payload);
                                }
                                prop_assert!(!refused.message.is_empty());
                            }
                        }
                    }
                }
            }

            #[test]
            fn fuzz_request_header_round_trip(h in header()) {
                let mut b = BytesMut::new();
                encode_request_header(&mut b, &h);
                prop_assert_eq!(b.len(), REQUEST_HEADER_LEN);
                prop_assert_eq!(parse_request_header(&b), Ok(Some(h)));
                // Any prefix is "incomplete", never an error or a panic.
                for n in 0..REQUEST_HEADER_LEN {
                    prop_assert_eq!(parse_request_header(&b[..n]), Ok(None));
                }
            }

            #[test]
            fn fuzz_client_flags(bytes in prop::collection::vec(any::<u8>(), 0..8), low in 0u32..8) {
                for b in [bytes.clone(), low.to_be_bytes().to_vec()] {
                    match parse_client_flags(&b) {
                        Ok(None) => prop_assert!(b.len() < 4),
                        Ok(Some(f)) => {
                            let v = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                            prop_assert_eq!(v & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES), 0);
                            prop_assert_eq!(f.fixed_newstyle, v & FLAG_C_FIXED_NEWSTYLE != 0);
                            prop_assert_eq!(f.no_zeroes, v & FLAG_C_NO_ZEROES != 0);
                        }
                        Err(FrameError::UnknownClientFlags(v)) => {
                            prop_assert!(v & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0);
                        }
                        Err(e) => prop_assert!(false, "unexpected frame error {e}"),
                    }
                }
            }

            #[test]
            fn fuzz_option_header(
                magic in prop_oneof![Just(IHAVEOPT), any::<u64>()],
                option: u32,
                length in prop_oneof![any::<u32>(), Just(MAX_OPTION_DATA_BYTES + 1), 0u32..64],
                cut in 0usize..=OPTION_HEADER_LEN,
            ) {
                let mut b = BytesMut::new();
                b.put_u64(magic);
                b.put_u32(option);
                b.put_u32(length);
                match parse_option_header(&b[..cut]) {
                    Ok(None) => prop_assert!(cut < OPTION_HEADER_LEN),
                    Ok(Some(h)) => {
                        prop_assert!(cut == OPTION_HEADER_LEN && magic == IHAVEOPT);
                        prop_assert_eq!(h, OptionHeader { option, length });
                    }
                    Err(FrameError::BadOptionMagic(m)) => prop_assert!(cut == OPTION_HEADER_LEN && m == magic && m != IHAVEOPT),
                    Err(e) => prop_assert!(false, "unexpected frame error {e}"),
                }
            }

            #[test]
            fn fuzz_parse_option_every_code(
                option in prop_oneof![0u32..=12, any::<u32>()],
                data in option_data(),
            ) {
                let parsed = parse_option(option, &data);
                match (option, &parsed) {
                    (opt::INFO | opt::GO, Ok(ClientOption::Info { name, requests } | ClientOption::Go { name, requests })) => {
                        // Accepted only when both lengths tell the truth.
                        prop_assert_eq!(data.len(), 4 + name.len() + 2 + 2 * requests.len());
                        prop_assert_eq!(u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize, name.len());
                        prop_assert_eq!(&data[4..4 + name.len()], name.as_bytes());
                        prop_assert_eq!(parsed.clone().is_ok_and(|o| matches!(o, ClientOption::Go { .. })), option == opt::GO);
                    }
                    (opt::INFO | opt::GO, Err(e)) => prop_assert!(!e.0.is_empty()),
                    (opt::EXPORT_NAME, r) => prop_assert_eq!(r.is_ok(), std::str::from_utf8(&data).is_ok()),
                    (opt::LIST | opt::STARTTLS | opt::STRUCTURED_REPLY, r) => prop_assert_eq!(r.is_ok(), data.is_empty()),
                    (opt::ABORT, r) => prop_assert_eq!(r, &Ok(ClientOption::Abort)),
                    (opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT | opt::EXTENDED_HEADERS, r) => prop_assert!(r.is_ok()),
                    (n, r) if n > opt::EXTENDED_HEADERS || n == 0 || n == opt::PEEK_EXPORT => {
                        prop_assert_eq!(r, &Ok(ClientOption::Unknown(n)));
                    }
                    (n, r) => prop_assert!(false, "option {n} gave {r:?}"),
                }
            }

            /// The option phase as a pure state machine over one arbitrary
            /// byte stream: client flags, then options whose headers may
            /// carry any magic and whose lengths may exceed what follows.
            /// Each step consumes exactly the bytes it claims, and the walk
            /// always ends (incomplete, hard disconnect, or a final option).
            #[test]
            fn fuzz_option_phase_stream(
                flags in prop_oneof![0u32..4, any::<u32>()],
                options in prop::collection::vec(
                    (prop_oneof![Just(IHAVEOPT), any::<u64>()], prop_oneof![0u32..=12, any::<u32>()], option_data(),
                     prop_oneof![Just(None), any::<u32>().prop_map(Some), (0u32..100).prop_map(Some)]),
                    0..6),
                trailer in prop::collection::vec(any::<u8>(), 0..24),
            ) {
                let mut stream = BytesMut::new();
                stream.put_u32(flags);
                for (magic, option, data, lie) in &options {
                    stream.put_u64(*magic);
                    stream.put_u32(*option);
                    stream.put_u32(lie.unwrap_or(data.len() as u32));
                    stream.put_slice(data);
                }
                stream.put_slice(&trailer);
                let s = &stream[..];
                let Ok(Some(_)) = parse_client_flags(s) else { return Ok(()) };
                let mut at = 4;
                let mut steps = 0;
                loop {
                    steps += 1;
                    prop_assert!(steps <= options.len() + trailer.len() + 1, "the walk does not advance");
                    let h = match parse_option_header(&s[at..]) {
                        Ok(Some(h)) => h,
                        Ok(None) => break,
                        Err(FrameError::BadOptionMagic(_)) => break,
                        Err(e) => { prop_assert!(false, "unexpected frame error {e}"); unreachable!() }
                    };
                    at += OPTION_HEADER_LEN;
                    let len = h.length as usize;
                    if h.length > MAX_OPTION_DATA_BYTES || s.len() - at < len {
                        // Skipped (or waited for) without being parsed.
                        break;
                    }
                    let data = &s[at..at + len];
                    at += len;
                    // These end the option phase; every other option, valid
                    // or not, gets a reply and the phase goes on.
                    if let Ok(ClientOption::ExportName(_) | ClientOption::Abort | ClientOption::Go { .. }) =
                        parse_option(h.option, data)
                    {
                        break;
                    }
                }
                prop_assert!(at <= s.len());
            }
        }
    }
}
