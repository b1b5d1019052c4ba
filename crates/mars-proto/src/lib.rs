//! The peer protocol between `marsd` nodes (TCP, on each node's `--listen` address).
//!
//! Since protocol 5 every connection is TLS 1.3 first (see the `tls` module
//! of the `mars` crate); frames travel inside it. Every frame:
//!
//! ```text
//!  0 u32 magic "MRSP"     4 u16 protocol version    6 u16 kind (1 = JSON message,
//!                                                     2 = data, 3 = zstd data)
//!  8 u32 payload length  12 u32 crc32c(payload)    16 payload
//! ```
//! (little-endian). A connection starts with [`Msg::Hello`] from the side that
//! connects; the other side answers [`Msg::Welcome`] or [`Msg::Refused`] (other
//! cluster, other protocol version, unknown node) and closes. A malformed
//! frame closes the connection and never changes state.
//!
//! Version history: 1 = first protocol (2026-11); 2 = version format 2;
//! 3 = log record format 2; 4 = resource and node identities; 5 = TLS
//! links, tokens; 6 = compressed data frames (see [`PROTOCOL_VERSION`] and
//! [`codec`]).

pub mod codec;
pub mod gossip;
pub mod token;

pub use codec::{Codec, Packed, Packer, Unpacker, KIND_ZSTD};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// 2: logfile versions of format 2 (a node of protocol 1 refuses them as inconsistent).
/// 3: log records of format 2 (`durable_back`; a node of protocol 2 refuses them).
/// 4: metadata keys name resource incarnations and nodes by `NAME@ID`, data
/// requests name the incarnation, `NodeInfo.id`.
/// 5: links are mutual TLS; `Join` carries a token and a public key,
/// `Joined` the certificate, `MergeToken` before `Merge`.
/// 6: `Fetch` and `SyncBlock` say which codecs the requester `accept`s, and
/// data frames of kind 3 carry zstd ([`codec`]).
pub const PROTOCOL_VERSION: u16 = 6;
pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"MRSP");
pub const FRAME_HEADER_LEN: usize = 16;
/// Largest payload accepted (metadata only; data moves in later kinds).
pub const MAX_PAYLOAD: u32 = 16 << 20;
pub const KIND_JSON: u16 = 1;
/// Raw bytes following a message that announces them (logfile chunks, disk blocks).
pub const KIND_DATA: u16 = 2;

#[derive(Debug, Error)]
pub enum ProtoError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad frame magic {0:#010x} (not a mars peer?)")]
    BadMagic(u32),
    #[error("peer speaks protocol version {0}, this node speaks {PROTOCOL_VERSION}: run the same mars release on every node of the cluster")]
    BadVersion(u16),
    #[error("unknown frame kind {0}")]
    BadKind(u16),
    #[error("frame of {0} bytes exceeds the limit of {MAX_PAYLOAD}")]
    TooLarge(u32),
    #[error("frame checksum mismatch")]
    BadChecksum,
    #[error("bad compressed data frame: {0}")]
    Compress(String),
    #[error("undecodable message: {0}")]
    Decode(String),
    #[error("refused by peer: {0}")]
    Refused(String),
    #[error("unexpected message from peer: {0}")]
    Unexpected(String),
}

/// One metadata entry on the wire: key, Lamport stamp, value (None = tombstone).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireEntry {
    pub key: String,
    pub clock: u64,
    pub node: String,
    pub value: Option<serde_json::Value>,
    #[serde(default)]
    pub deleted_ms: u64,
}

/// Who a node is, as carried in handshakes and membership.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    /// Peer address (TCP for this protocol, UDP for gossip), HOST:PORT.
    pub listen: String,
    /// NBD address.
    pub nbd: String,
    /// The id this node drew when it was made a node (`create-cluster`,
    /// `join-cluster`): with the name, its identity in the metadata (a node
    /// that left and a new node of its name are different nodes). 0 from
    /// tools that are no node.
    #[serde(default)]
    pub id: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "kebab-case")]
pub enum Msg {
    /// First frame of every connection. `cluster_id` None: a node that wants to join.
    Hello {
        version: u16,
        cluster_id: Option<String>,
        node: NodeInfo,
    },
    Welcome {
        cluster_id: String,
        node: String,
    },
    Refused {
        reason: String,
    },

    /// Make the sender a node of this cluster with the invitation token
    /// `token_id`/`secret` (sent inside TLS to the server whose CA the token
    /// pins, before any `Hello`); `public_key` (DER SubjectPublicKeyInfo) is
    /// certified for `node`. Answered by `Joined` or `Refused`.
    Join {
        token_id: String,
        secret: String,
        node: NodeInfo,
        public_key: Vec<u8>,
    },
    /// The cluster id, all cluster-wide entries, the joiner's certificate,
    /// and the CA (certificate and key) that signed it.
    Joined {
        cluster_id: String,
        entries: Vec<WireEntry>,
        cert: String,
        ca_cert: String,
        ca_key: String,
    },
    /// Redeem a merge token (`invite --merge`) before `Merge`; answered by
    /// `Ok` or `Refused`.
    MergeToken {
        token_id: String,
        secret: String,
        node: NodeInfo,
    },

    /// Anti-entropy, step 1: the digest of everything under `prefix`.
    Digest {
        prefix: String,
        digest: String,
    },
    /// Step 2 (when digests differ): per-bucket digests.
    Buckets {
        prefix: String,
        digests: Vec<String>,
    },
    /// Step 3: entries of the buckets that differ, and which buckets to send back.
    Entries {
        prefix: String,
        entries: Vec<WireEntry>,
        want: Vec<u16>,
    },
    /// Digests equal, or nothing more to send.
    InSync,

    /// New entries, pushed as they are made (resource scope, to members).
    Push {
        entries: Vec<WireEntry>,
    },
    /// Send everything under `prefix` (a node that asks about a resource).
    Pull {
        prefix: String,
    },

    /// Merge the sender's cluster (`cluster_id`, with these cluster-wide entries) into the receiver's.
    Merge {
        cluster_id: String,
        entries: Vec<WireEntry>,
    },
    /// Merge accepted: the receiver's cluster id and cluster-wide entries.
    Merged {
        cluster_id: String,
        entries: Vec<WireEntry>,
    },

    Ok,

    // Replication (version 1 additions).
    /// Primary: the log position where a full sync starts (or ends), and the device size.
    SyncStart {
        res: String,
    },
    SyncEnd {
        res: String,
    },
    /// The primary's durable log position now (answered with `SyncInfo`):
    /// `view RES` on a secondary asks it so that `wait-resource RES uptodate`
    /// never judges on a position published before the latest writes.
    LogStatus {
        res: String,
    },
    SyncInfo {
        pos: u64,
        size: u64,
        /// The source's logfile holding the records up to `pos` (name, start
        /// position): where a full sync's history begins (since 2026-12-06;
        /// absent from older peers and in answers to `LogStatus`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        logfile: Option<(String, u64)>,
    },
    /// Secondary: my block at `offset` has this blake3 digest; send yours if it differs.
    SyncBlock {
        res: String,
        offset: u64,
        len: u32,
        digest: String,
        /// Codecs the requester accepts for the block's data frame (since
        /// protocol 6; empty: raw only).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        accept: Vec<Codec>,
    },
    Same,
    /// The block follows as a data frame.
    BlockData {
        offset: u64,
        len: u32,
    },
    /// List the logfiles (and versions) a member holds for a resource.
    LogList {
        res: String,
    },
    Logs {
        files: Vec<LogFileInfo>,
        versions: Vec<(String, String)>,
        /// The member writes this log (its current logfile may grow); false when
        /// it holds no logger, so what it lists is all it has.
        #[serde(default)]
        open: bool,
        /// The member writes this log now (it runs the logger): its list is its
        /// whole history up to where the log is durable. False from sources
        /// older than this field.
        #[serde(default)]
        writes: bool,
    },
    /// Send up to `max` bytes of `file` from `offset`.
    Fetch {
        res: String,
        file: String,
        offset: u64,
        max: u32,
        /// Codecs the requester accepts for the chunk's data frame (since
        /// protocol 6; empty: raw only).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        accept: Vec<Codec>,
    },
    /// The chunk follows as a data frame of `len` bytes.
    Chunk {
        file: String,
        offset: u64,
        len: u32,
    },

    // Verify and repair (since 2026-12-07; older peers refuse them as
    // unexpected). See `mars_logger::freeze`.
    /// Freeze this member's copy of `res` at log position `at` (the
    /// primary's writeback, a secondary's replay), then digest `len` bytes of
    /// its disk from `offset` (none when `len` is 0). Answered by `Frozen`.
    Freeze {
        res: String,
        at: u64,
        offset: u64,
        len: u64,
    },
    /// Held at `pos`. When `pos` is the position asked for and a digest was
    /// asked for, a data frame with it follows (`RangeDigest::encode`);
    /// when `pos` is past it, nothing follows (freeze all copies at `pos`).
    Frozen {
        pos: u64,
        digest: bool,
    },
    /// Send `len` bytes of the disk from `offset`, frozen at `at`: answered
    /// by `BlockData` and a data frame.
    FrozenRead {
        res: String,
        at: u64,
        offset: u64,
        len: u32,
    },
    /// A data frame of `len` bytes follows: good blocks of the moment `at`
    /// (from another copy) to write at `offset` of the frozen disk. `Ok`.
    FrozenRepair {
        res: String,
        at: u64,
        offset: u64,
        len: u32,
    },
    /// The checksum table, not the disk, is wrong at `block`: set it to
    /// `crc` (the copy is frozen at `at`). `Ok`.
    FrozenCorrect {
        res: String,
        at: u64,
        block: u64,
        crc: u32,
    },
    /// End this member's freeze of `res`. `Ok`.
    Thaw {
        res: String,
    },
}

/// One logfile as listed by `Logs`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogFileInfo {
    pub name: String,
    pub start_pos: u64,
    pub len: u64,
    /// A later logfile exists: this one will not grow any more.
    pub finished: bool,
    /// `created_ns` of its file header (0: not sent, an older peer): with the
    /// name and start, tells a logfile from another of the same name written
    /// in an earlier life of its writer.
    #[serde(default)]
    pub created_ns: u64,
}

/// A frame: a message, or raw data announced by the message before it.
#[derive(Debug)]
pub enum Frame {
    Msg(Msg),
    Data(Vec<u8>),
}

pub fn encode_frame(msg: &Msg) -> Vec<u8> {
    // Serialising our own enum of strings, numbers and JSON values cannot fail.
    let payload = serde_json::to_vec(msg).unwrap_or_default();
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + payload.len());
    out.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    out.extend_from_slice(&KIND_JSON.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Check a frame header; returns the payload length and stored crc.
pub fn parse_frame_header(h: &[u8]) -> Result<(u32, u32), ProtoError> {
    let (kind, len, crc) = parse_frame_header_kind(h)?;
    if kind != KIND_JSON {
        return Err(ProtoError::BadKind(kind));
    }
    Ok((len, crc))
}

/// Check a frame header of any kind; returns kind, payload length and stored crc.
pub fn parse_frame_header_kind(h: &[u8]) -> Result<(u16, u32, u32), ProtoError> {
    if h.len() < FRAME_HEADER_LEN {
        return Err(ProtoError::Decode(format!(
            "short frame header: {} bytes",
            h.len()
        )));
    }
    let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let magic = u32_at(0);
    if magic != FRAME_MAGIC {
        return Err(ProtoError::BadMagic(magic));
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if version != PROTOCOL_VERSION {
        return Err(ProtoError::BadVersion(version));
    }
    let kind = u16::from_le_bytes([h[6], h[7]]);
    if kind != KIND_JSON && kind != KIND_DATA && kind != KIND_ZSTD {
        return Err(ProtoError::BadKind(kind));
    }
    let len = u32_at(8);
    if len > MAX_PAYLOAD {
        return Err(ProtoError::TooLarge(len));
    }
    Ok((kind, len, u32_at(12)))
}

/// Decode a payload whose crc was given in the header.
pub fn decode_payload(payload: &[u8], crc: u32) -> Result<Msg, ProtoError> {
    if crc32c::crc32c(payload) != crc {
        return Err(ProtoError::BadChecksum);
    }
    serde_json::from_slice(payload).map_err(|e| ProtoError::Decode(e.to_string()))
}

/// Decode one whole frame from a buffer (for tests and fuzzing).
pub fn decode_frame(buf: &[u8]) -> Result<Msg, ProtoError> {
    let (len, crc) = parse_frame_header(buf)?;
    let end = FRAME_HEADER_LEN + len as usize;
    if buf.len() < end {
        return Err(ProtoError::Decode(format!(
            "short frame: need {end} bytes, have {}",
            buf.len()
        )));
    }
    decode_payload(&buf[FRAME_HEADER_LEN..end], crc)
}

pub async fn write_msg<W: AsyncWrite + Unpin>(w: &mut W, msg: &Msg) -> Result<(), ProtoError> {
    w.write_all(&encode_frame(msg)).await?;
    w.flush().await?;
    Ok(())
}

pub async fn read_msg<R: AsyncRead + Unpin>(r: &mut R) -> Result<Msg, ProtoError> {
    match read_frame(r).await? {
        Frame::Msg(m) => Ok(m),
        Frame::Data(_) => Err(ProtoError::Unexpected(
            "data frame where a message belongs".into(),
        )),
    }
}

pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame, ProtoError> {
    read_frame_max(r, MAX_PAYLOAD).await
}

/// [`read_msg`] of a frame of at most `max` payload bytes (checked before
/// anything is allocated): what a peer not yet authenticated may send.
pub async fn read_msg_max<R: AsyncRead + Unpin>(r: &mut R, max: u32) -> Result<Msg, ProtoError> {
    match read_frame_max(r, max).await? {
        Frame::Msg(m) => Ok(m),
        Frame::Data(_) => Err(ProtoError::Unexpected(
            "data frame where a message belongs".into(),
        )),
    }
}

async fn read_frame_max<R: AsyncRead + Unpin>(r: &mut R, max: u32) -> Result<Frame, ProtoError> {
    let mut h = [0u8; FRAME_HEADER_LEN];
    r.read_exact(&mut h).await?;
    let (kind, len, crc) = parse_frame_header_kind(&h)?;
    if len > max {
        return Err(ProtoError::TooLarge(len));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).await?;
    if kind == KIND_ZSTD {
        // Bounded by the frame's limit: the announced length is checked
        // against it before anything is allocated for the data.
        codec::check_zstd_len(payload.len(), max as usize)?;
        let announced = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
        if announced > max {
            return Err(ProtoError::TooLarge(announced));
        }
        let mut out = vec![0u8; announced as usize];
        let n = Unpacker::new().unpack(&payload, crc, &mut out)?;
        out.truncate(n);
        return Ok(Frame::Data(out));
    }
    if kind == KIND_DATA {
        if crc32c::crc32c(&payload) != crc {
            return Err(ProtoError::BadChecksum);
        }
        return Ok(Frame::Data(payload));
    }
    decode_payload(&payload, crc).map(Frame::Msg)
}

/// [`read_data`] into `buf` (its length becomes the payload's): a buffer used again
/// costs no allocation, zeroing or page faults per frame.
pub async fn read_data_into<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<(), ProtoError> {
    let mut h = [0u8; FRAME_HEADER_LEN];
    r.read_exact(&mut h).await?;
    let (kind, len, crc) = parse_frame_header_kind(&h)?;
    if kind == KIND_ZSTD {
        return Err(ProtoError::Unexpected(
            "a compressed data frame where raw data belongs".into(),
        ));
    }
    buf.resize(len as usize, 0);
    r.read_exact(buf).await?;
    if kind != KIND_DATA {
        let m = decode_payload(buf, crc)?;
        return Err(ProtoError::Unexpected(format!(
            "message {m:?} where data belongs"
        )));
    }
    if crc32c::crc32c(buf) != crc {
        return Err(ProtoError::BadChecksum);
    }
    Ok(())
}

/// [`read_data`] into the front of `buf`, which does not move or grow (a buffer
/// aligned for O_DIRECT): the payload's length. A larger frame is an error.
/// Raw frames only (see [`read_data_packed`]).
pub async fn read_data_into_slice<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
) -> Result<usize, ProtoError> {
    read_data_packed(r, buf, None).await
}

/// [`read_data_into_slice`] of a raw frame, or (with an `unpacker`) of a
/// compressed one (kind 3, see [`codec`]): the data's length, at most
/// `buf.len()`, which also bounds what a compressed frame may hold.
pub async fn read_data_packed<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    unpacker: Option<&mut Unpacker>,
) -> Result<usize, ProtoError> {
    let mut h = [0u8; FRAME_HEADER_LEN];
    r.read_exact(&mut h).await?;
    let (kind, len, crc) = parse_frame_header_kind(&h)?;
    let len = len as usize;
    if kind == KIND_ZSTD {
        let Some(u) = unpacker else {
            return Err(ProtoError::Unexpected(
                "a compressed data frame, which this request did not accept".into(),
            ));
        };
        codec::check_zstd_len(len, buf.len())?;
        r.read_exact(u.scratch(len)).await?;
        return u.unpack_scratch(len, crc, buf);
    }
    if kind != KIND_DATA {
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).await?;
        let m = decode_payload(&payload, crc)?;
        return Err(ProtoError::Unexpected(format!(
            "message {m:?} where data belongs"
        )));
    }
    if len > buf.len() {
        return Err(ProtoError::Unexpected(format!(
            "a data frame of {len} bytes where at most {} were asked for",
            buf.len()
        )));
    }
    r.read_exact(&mut buf[..len]).await?;
    if crc32c::crc32c(&buf[..len]) != crc {
        return Err(ProtoError::BadChecksum);
    }
    Ok(len)
}

/// Read a data frame (after a message that announced it).
pub async fn read_data<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, ProtoError> {
    match read_frame(r).await? {
        Frame::Data(d) => Ok(d),
        Frame::Msg(m) => Err(ProtoError::Unexpected(format!(
            "message {m:?} where data belongs"
        ))),
    }
}

pub async fn write_data<W: AsyncWrite + Unpin>(w: &mut W, data: &[u8]) -> Result<(), ProtoError> {
    let mut h = Vec::with_capacity(FRAME_HEADER_LEN);
    h.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
    h.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    h.extend_from_slice(&KIND_DATA.to_le_bytes());
    h.extend_from_slice(&(data.len() as u32).to_le_bytes());
    h.extend_from_slice(&crc32c::crc32c(data).to_le_bytes());
    w.write_all(&h).await?;
    w.write_all(data).await?;
    w.flush().await?;
    Ok(())
}

/// Send the data frame `p` whose body is `body` (see [`Packer::body`]).
pub async fn write_packed<W: AsyncWrite + Unpin>(
    w: &mut W,
    p: &Packed,
    body: &[u8],
) -> Result<(), ProtoError> {
    w.write_all(p.head()).await?;
    w.write_all(body).await?;
    w.flush().await?;
    Ok(())
}

/// Client side of the handshake: send Hello, expect Welcome.
pub async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    cluster_id: Option<&str>,
    me: &NodeInfo,
) -> Result<String, ProtoError> {
    let hello = Msg::Hello {
        version: PROTOCOL_VERSION,
        cluster_id: cluster_id.map(str::to_string),
        node: me.clone(),
    };
    write_msg(s, &hello).await?;
    match read_msg(s).await? {
        Msg::Welcome { node, .. } => Ok(node),
        Msg::Refused { reason } => Err(ProtoError::Refused(reason)),
        other => Err(ProtoError::Unexpected(format!("{other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A data frame of 64 bytes whose last byte was flipped after its checksum.
    async fn corrupt_data_frame() -> Vec<u8> {
        let mut bad = Vec::new();
        write_data(&mut bad, &[1u8; 64]).await.unwrap();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        bad
    }

    #[test]
    fn data_frames_into_a_fixed_slice() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut wire = Vec::new();
            write_data(&mut wire, &[7u8; 3000]).await.unwrap();
            write_data(&mut wire, &[8u8; 5000]).await.unwrap();
            let mut r = &wire[..];
            let mut buf = [0u8; 4096];
            assert_eq!(read_data_into_slice(&mut r, &mut buf).await.unwrap(), 3000);
            assert!(buf[..3000].iter().all(|&b| b == 7));
            assert!(
                buf[3000..].iter().all(|&b| b == 0),
                "nothing past the frame"
            );
            // Larger than the slice: an error.
            assert!(matches!(
                read_data_into_slice(&mut r, &mut buf).await,
                Err(ProtoError::Unexpected(m)) if m.contains("5000")
            ));
            let mut wire = Vec::new();
            write_msg(&mut wire, &Msg::Same).await.unwrap();
            wire.extend_from_slice(&corrupt_data_frame().await);
            let mut r = &wire[..];
            assert!(matches!(
                read_data_into_slice(&mut r, &mut buf).await,
                Err(ProtoError::Unexpected(m)) if m.contains("Same")
            ));
            assert!(matches!(
                read_data_into_slice(&mut r, &mut buf).await,
                Err(ProtoError::BadChecksum)
            ));
        });
    }

    #[test]
    fn compressed_and_raw_frames_on_one_stream() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let text: Vec<u8> = (0..300_000u32)
                .map(|i| b"mars log "[i as usize % 9])
                .collect();
            let mut x = 88_172_645_463_325_252u64;
            let random: Vec<u8> = (0..300_000u32)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let mut p = Packer::new(codec::DEFAULT_LEVEL).unwrap();
            let mut wire = Vec::new();
            let mut wire_lens = Vec::new();
            for d in [&text, &random, &text] {
                let packed = p.pack(d);
                wire_lens.push((packed.compressed(), packed.wire_len()));
                write_packed(&mut wire, &packed, p.body(&packed, d))
                    .await
                    .unwrap();
            }
            assert!(wire_lens[0].0 && wire_lens[0].1 < 10_000, "{wire_lens:?}");
            assert!(!wire_lens[1].0, "{wire_lens:?}");
            let mut r = &wire[..];
            let mut u = Unpacker::new();
            let mut buf = vec![0u8; 300_000];
            for d in [&text, &random, &text] {
                let n = read_data_packed(&mut r, &mut buf, Some(&mut u))
                    .await
                    .unwrap();
                assert_eq!(&buf[..n], &d[..]);
            }
            // A reader that did not accept compression refuses a compressed frame.
            let mut r = &wire[..];
            assert!(matches!(
                read_data_into_slice(&mut r, &mut buf).await,
                Err(ProtoError::Unexpected(m)) if m.contains("compressed")
            ));
            // A reader with less room refuses it before reading its payload.
            let mut r = &wire[..];
            let mut small = vec![0u8; 1000];
            assert!(matches!(
                read_data_packed(&mut r, &mut small, Some(&mut u)).await,
                Err(ProtoError::Compress(_))
            ));
            // The generic reader decodes it, within MAX_PAYLOAD.
            let mut r = &wire[..];
            match read_frame(&mut r).await.unwrap() {
                Frame::Data(d) => assert_eq!(d, text),
                other => panic!("{other:?}"),
            }
        });
    }

    #[test]
    fn requests_without_codecs_look_as_before() {
        let m = Msg::Fetch {
            res: "r0@0000000000000001".into(),
            file: "log-1-a".into(),
            offset: 0,
            max: 4096,
            accept: vec![],
        };
        let json = serde_json::to_string(&m).unwrap();
        assert!(!json.contains("accept"), "{json}");
        let m = Msg::Fetch {
            res: "r0@0000000000000001".into(),
            file: "log-1-a".into(),
            offset: 0,
            max: 4096,
            accept: vec![Codec::Zstd],
        };
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains(r#""accept":["zstd"]"#), "{json}");
        assert_eq!(decode_frame(&encode_frame(&m)).unwrap(), m);
    }

    #[test]
    fn data_frames_into_a_reused_buffer() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut wire = Vec::new();
            write_data(&mut wire, &[7u8; 5000]).await.unwrap();
            write_data(&mut wire, &[9u8; 100]).await.unwrap();
            write_msg(&mut wire, &Msg::Same).await.unwrap();
            wire.extend_from_slice(&corrupt_data_frame().await);
            let mut r = &wire[..];
            let mut buf = Vec::new();
            read_data_into(&mut r, &mut buf).await.unwrap();
            assert_eq!(buf, vec![7u8; 5000]);
            read_data_into(&mut r, &mut buf).await.unwrap();
            assert_eq!(buf, vec![9u8; 100], "a shorter frame into a longer buffer");
            assert!(matches!(
                read_data_into(&mut r, &mut buf).await,
                Err(ProtoError::Unexpected(_))
            ));
            assert!(matches!(
                read_data_into(&mut r, &mut buf).await,
                Err(ProtoError::BadChecksum)
            ));
        });
    }

    #[test]
    fn frame_round_trip_and_damage() {
        let m = Msg::Digest {
            prefix: "c/".into(),
            digest: "ab".into(),
        };
        let mut f = encode_frame(&m);
        assert_eq!(decode_frame(&f).unwrap(), m);
        let last = f.len() - 1;
        f[last] ^= 1;
        assert!(matches!(decode_frame(&f), Err(ProtoError::BadChecksum)));
        let mut f = encode_frame(&m);
        f[4] = 9;
        assert!(matches!(decode_frame(&f), Err(ProtoError::BadVersion(9))));
        let mut f = encode_frame(&m);
        f[0] = b'X';
        assert!(matches!(decode_frame(&f), Err(ProtoError::BadMagic(_))));
        let mut f = encode_frame(&m);
        f[8..12].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert!(matches!(decode_frame(&f), Err(ProtoError::TooLarge(_))));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_frame(&bytes);
        }
        #[test]
        fn valid_header_garbage_payload_never_panics(payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut f = Vec::new();
            f.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
            f.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
            f.extend_from_slice(&KIND_JSON.to_le_bytes());
            f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            f.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
            f.extend_from_slice(&payload);
            let _ = decode_frame(&f);
        }
    }
}
