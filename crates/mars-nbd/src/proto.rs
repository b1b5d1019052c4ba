//! NBD wire constants and pure, panic-free parsers/encoders.
//!
//! Everything here works on byte slices only; no I/O. All parsers return a
//! [`ProtoError`] on short or inconsistent input and never panic.

// ---------------------------------------------------------------- magics

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, sent by the server after `NBDMAGIC` and by the client before each option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every fixed-newstyle option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Size of a (compact) request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of an option header (IHAVEOPT, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of an option reply header (magic, option, reply type, length).
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Maximum length of an NBD string (export names, messages).
pub const MAX_STRING_LEN: usize = 4096;

// ---------------------------------------------------------------- handshake flags

pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;

pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---------------------------------------------------------------- transmission flags

pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const NBD_FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---------------------------------------------------------------- options

pub const NBD_OPT_EXPORT_NAME: u32 = 1;
pub const NBD_OPT_ABORT: u32 = 2;
pub const NBD_OPT_LIST: u32 = 3;
pub const NBD_OPT_PEEK_EXPORT: u32 = 4;
pub const NBD_OPT_STARTTLS: u32 = 5;
pub const NBD_OPT_INFO: u32 = 6;
pub const NBD_OPT_GO: u32 = 7;
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
pub const NBD_OPT_EXTENDED_HEADERS: u32 = 11;

// ---------------------------------------------------------------- option replies

pub const NBD_REP_ACK: u32 = 1;
pub const NBD_REP_SERVER: u32 = 2;
pub const NBD_REP_INFO: u32 = 3;
pub const NBD_REP_META_CONTEXT: u32 = 4;
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR | 2;
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_FLAG_ERROR | 4;
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR | 5;
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR | 7;
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR | 8;
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR | 9;

// ---------------------------------------------------------------- NBD_REP_INFO types

pub const NBD_INFO_EXPORT: u16 = 0;
pub const NBD_INFO_NAME: u16 = 1;
pub const NBD_INFO_DESCRIPTION: u16 = 2;
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------- command flags

pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// ---------------------------------------------------------------- commands

pub const NBD_CMD_READ: u16 = 0;
pub const NBD_CMD_WRITE: u16 = 1;
pub const NBD_CMD_DISC: u16 = 2;
pub const NBD_CMD_FLUSH: u16 = 3;
pub const NBD_CMD_TRIM: u16 = 4;
pub const NBD_CMD_CACHE: u16 = 5;
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;
pub const NBD_CMD_RESIZE: u16 = 8;

// ---------------------------------------------------------------- errors (reply error field)

pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

/// Errors of the pure parsers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("short buffer: need {need} bytes, got {got}")]
    Short { need: usize, got: usize },
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("malformed payload: {0}")]
    Malformed(&'static str),
}

/// Transmission command type; unknown values are preserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Resize,
    Unknown(u16),
}

impl Command {
    pub fn from_u16(v: u16) -> Command {
        match v {
            NBD_CMD_READ => Command::Read,
            NBD_CMD_WRITE => Command::Write,
            NBD_CMD_DISC => Command::Disc,
            NBD_CMD_FLUSH => Command::Flush,
            NBD_CMD_TRIM => Command::Trim,
            NBD_CMD_CACHE => Command::Cache,
            NBD_CMD_WRITE_ZEROES => Command::WriteZeroes,
            NBD_CMD_BLOCK_STATUS => Command::BlockStatus,
            NBD_CMD_RESIZE => Command::Resize,
            other => Command::Unknown(other),
        }
    }

    pub fn to_u16(self) -> u16 {
        match self {
            Command::Read => NBD_CMD_READ,
            Command::Write => NBD_CMD_WRITE,
            Command::Disc => NBD_CMD_DISC,
            Command::Flush => NBD_CMD_FLUSH,
            Command::Trim => NBD_CMD_TRIM,
            Command::Cache => NBD_CMD_CACHE,
            Command::WriteZeroes => NBD_CMD_WRITE_ZEROES,
            Command::BlockStatus => NBD_CMD_BLOCK_STATUS,
            Command::Resize => NBD_CMD_RESIZE,
            Command::Unknown(v) => v,
        }
    }
}

/// A parsed transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// Parsed `NBD_OPT_INFO` / `NBD_OPT_GO` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name (valid UTF-8, at most [`MAX_STRING_LEN`] bytes).
    pub name: String,
    /// Requested `NBD_INFO_*` items, in client order.
    pub requests: Vec<u16>,
}

// ---------------------------------------------------------------- byte helpers

fn need(buf: &[u8], n: usize) -> Result<(), ProtoError> {
    if buf.len() < n {
        Err(ProtoError::Short {
            need: n,
            got: buf.len(),
        })
    } else {
        Ok(())
    }
}

fn be_u16(b: &[u8], at: usize) -> Result<u16, ProtoError> {
    let s = b
        .get(at..at + 2)
        .ok_or(ProtoError::Malformed("truncated u16"))?;
    Ok(u16::from_be_bytes([s[0], s[1]]))
}

fn be_u32(b: &[u8], at: usize) -> Result<u32, ProtoError> {
    let s = b
        .get(at..at + 4)
        .ok_or(ProtoError::Malformed("truncated u32"))?;
    Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn be_u64(b: &[u8], at: usize) -> Result<u64, ProtoError> {
    let s = b
        .get(at..at + 8)
        .ok_or(ProtoError::Malformed("truncated u64"))?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Ok(u64::from_be_bytes(a))
}

// ---------------------------------------------------------------- parsers

/// Parse a 28-byte request header (extra trailing bytes are ignored).
pub fn parse_request(buf: &[u8]) -> Result<Request, ProtoError> {
    need(buf, REQUEST_LEN)?;
    let magic = be_u32(buf, 0)?;
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic(u64::from(magic)));
    }
    Ok(Request {
        flags: be_u16(buf, 4)?,
        kind: Command::from_u16(be_u16(buf, 6)?),
        cookie: be_u64(buf, 8)?,
        offset: be_u64(buf, 16)?,
        length: be_u32(buf, 24)?,
    })
}

/// Encode a request header (the client side; used by tests and tools).
pub fn encode_request(r: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.kind.to_u16().to_be_bytes());
    b[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..28].copy_from_slice(&r.length.to_be_bytes());
    b
}

/// Parse a 16-byte option header: returns `(option, payload length)`.
pub fn parse_option_header(buf: &[u8]) -> Result<(u32, u32), ProtoError> {
    need(buf, OPTION_HEADER_LEN)?;
    let magic = be_u64(buf, 0)?;
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic(magic));
    }
    Ok((be_u32(buf, 8)?, be_u32(buf, 12)?))
}

/// Encode an option header (client side; used by tests).
pub fn encode_option_header(option: u32, len: u32) -> [u8; OPTION_HEADER_LEN] {
    let mut b = [0u8; OPTION_HEADER_LEN];
    b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&len.to_be_bytes());
    b
}

/// Parse the payload of `NBD_OPT_INFO` / `NBD_OPT_GO`:
/// u32 name length, name, u16 number of info requests, u16 each.
/// The lengths must account for the payload exactly.
pub fn parse_info_request(buf: &[u8]) -> Result<InfoRequest, ProtoError> {
    need(buf, 6)?;
    let name_len = usize::try_from(be_u32(buf, 0)?)
        .map_err(|_| ProtoError::Malformed("name length overflows"))?;
    if name_len > MAX_STRING_LEN {
        return Err(ProtoError::Malformed("export name longer than 4096 bytes"));
    }
    // name_len MUST be no larger than the option data length - 6
    if name_len > buf.len() - 6 {
        return Err(ProtoError::Malformed("name length exceeds payload"));
    }
    let name_end = 4 + name_len;
    let name_bytes = buf
        .get(4..name_end)
        .ok_or(ProtoError::Malformed("name length exceeds payload"))?;
    let name = std::str::from_utf8(name_bytes)
        .map_err(|_| ProtoError::Malformed("export name is not UTF-8"))?;
    if name.contains('\0') {
        return Err(ProtoError::Malformed("export name contains NUL"));
    }
    let n = usize::from(be_u16(buf, name_end)?);
    let rest = buf
        .get(name_end + 2..)
        .ok_or(ProtoError::Malformed("truncated info request list"))?;
    if rest.len() != n * 2 {
        return Err(ProtoError::Malformed(
            "info request count does not match payload",
        ));
    }
    let requests = rest
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Ok(InfoRequest {
        name: name.to_owned(),
        requests,
    })
}

/// Encode an `NBD_OPT_INFO` / `NBD_OPT_GO` payload (client side; used by tests).
pub fn encode_info_request(name: &[u8], requests: &[u16]) -> Vec<u8> {
    let mut v = Vec::with_capacity(6 + name.len() + 2 * requests.len());
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name);
    v.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        v.extend_from_slice(&r.to_be_bytes());
    }
    v
}

// ---------------------------------------------------------------- server-side encoders

/// Append an option reply (header + data) to `out`.
pub fn put_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    // Our replies are always far below 4 GiB (names are capped at 4096 bytes).
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Parse an option reply header: `(option, reply type, length)`.
pub fn parse_option_reply_header(buf: &[u8]) -> Result<(u32, u32, u32), ProtoError> {
    need(buf, OPTION_REPLY_HEADER_LEN)?;
    let magic = be_u64(buf, 0)?;
    if magic != OPT_REPLY_MAGIC {
        return Err(ProtoError::BadMagic(magic));
    }
    Ok((be_u32(buf, 8)?, be_u32(buf, 12)?, be_u32(buf, 16)?))
}

/// Encode a simple reply header.
pub fn encode_simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Parse a simple reply header: `(error, cookie)`.
pub fn parse_simple_reply(buf: &[u8]) -> Result<(u32, u64), ProtoError> {
    need(buf, SIMPLE_REPLY_LEN)?;
    let magic = be_u32(buf, 0)?;
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(ProtoError::BadMagic(u64::from(magic)));
    }
    Ok((be_u32(buf, 4)?, be_u64(buf, 8)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn short_inputs_are_errors() {
        assert!(matches!(
            parse_request(&[0u8; 27]),
            Err(ProtoError::Short { need: 28, got: 27 })
        ));
        assert!(parse_option_header(&[]).is_err());
        assert!(parse_info_request(&[0, 0, 0]).is_err());
    }

    #[test]
    fn info_request_examples() {
        let p = encode_info_request(b"disk", &[NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME]);
        let r = parse_info_request(&p).unwrap();
        assert_eq!(r.name, "disk");
        assert_eq!(r.requests, vec![NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME]);
        // empty name, no requests
        assert_eq!(
            parse_info_request(&[0, 0, 0, 0, 0, 0]).unwrap(),
            InfoRequest {
                name: String::new(),
                requests: vec![]
            }
        );
        // name length too large
        assert!(parse_info_request(&[0, 0, 0, 9, b'a', 0, 0]).is_err());
        // count says 1 but no item
        assert!(parse_info_request(&[0, 0, 0, 0, 0, 1]).is_err());
        // trailing garbage
        assert!(parse_info_request(&[0, 0, 0, 0, 0, 0, 7]).is_err());
        // max u32 name length
        assert!(parse_info_request(&[0xff, 0xff, 0xff, 0xff, 0, 0]).is_err());
    }

    #[test]
    fn bad_magic() {
        let mut b = encode_request(&Request {
            flags: 0,
            kind: Command::Read,
            cookie: 1,
            offset: 0,
            length: 0,
        });
        b[0] ^= 1;
        assert!(matches!(parse_request(&b), Err(ProtoError::BadMagic(_))));
        let mut h = encode_option_header(NBD_OPT_GO, 0);
        h[7] ^= 1;
        assert!(matches!(
            parse_option_header(&h),
            Err(ProtoError::BadMagic(_))
        ));
    }

    proptest! {
        #[test]
        fn parse_request_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_request(&buf);
        }

        #[test]
        fn parse_option_header_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = parse_option_header(&buf);
            let _ = parse_option_reply_header(&buf);
            let _ = parse_simple_reply(&buf);
        }

        #[test]
        fn parse_info_request_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_info_request(&buf);
        }

        #[test]
        fn parse_info_request_never_panics_structured(
            name_len in any::<u32>(),
            body in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut buf = name_len.to_be_bytes().to_vec();
            buf.extend_from_slice(&body);
            let _ = parse_info_request(&buf);
        }

        #[test]
        fn request_round_trip(flags in any::<u16>(), kind in any::<u16>(), cookie in any::<u64>(),
                              offset in any::<u64>(), length in any::<u32>()) {
            let r = Request { flags, kind: Command::from_u16(kind), cookie, offset, length };
            let enc = encode_request(&r);
            prop_assert_eq!(parse_request(&enc), Ok(r));
            prop_assert_eq!(r.kind.to_u16(), kind);
        }

        #[test]
        fn option_header_round_trip(opt in any::<u32>(), len in any::<u32>()) {
            prop_assert_eq!(parse_option_header(&encode_option_header(opt, len)), Ok((opt, len)));
        }

        #[test]
        fn info_request_round_trip(name in "[a-zA-Z0-9_./-]{0,64}",
                                   reqs in proptest::collection::vec(any::<u16>(), 0..16)) {
            let enc = encode_info_request(name.as_bytes(), &reqs);
            let dec = parse_info_request(&enc).unwrap();
            prop_assert_eq!(dec.name, name);
            prop_assert_eq!(dec.requests, reqs);
        }
    }
}
