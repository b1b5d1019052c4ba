//! Compression of data frames (protocol 6): a requester names the codecs it
//! accepts in its request (`Fetch`, `SyncBlock`), and the source sends each
//! chunk either raw (kind 2) or, when that made it smaller, as a zstd frame
//! (kind 3):
//!
//! ```text
//!  0 u32 magic "MRSP"   4 u16 protocol version   6 u16 kind = 3
//!  8 u32 payload length (4 + compressed bytes)  12 u32 crc32c of the UNCOMPRESSED bytes
//! 16 u32 uncompressed length
//! 20 one zstd frame (RFC 8878) that decompresses to exactly that many bytes
//! ```
//!
//! The receiver knows how many bytes it asked for (the chunk or block
//! announced by the message before): a frame whose payload or uncompressed
//! length is larger is refused before anything is allocated or decompressed,
//! zstd writes only into that room, and a frame that decompresses to more or
//! fewer bytes than it says, or whose crc does not match after decompression,
//! is an error (never a panic). See [`Unpacker`] and [`decode_data_frame`].
//!
//! The sender ([`Packer`]) first compresses a sample of a chunk larger than
//! 2 × [`SAMPLE`] ([`SAMPLE_PIECES`] pieces of `SAMPLE / SAMPLE_PIECES`
//! bytes at the start, end and evenly between): a sample that does not
//! shrink by at least 1/16 means the chunk goes raw, so incompressible data
//! costs the compression of 64 KiB per chunk (1.6 % of a 4 MiB chunk). Otherwise the whole chunk is compressed into a buffer
//! one byte smaller than the raw frame's payload would be: when it does not
//! fit, the chunk goes raw too.

use crate::{ProtoError, FRAME_HEADER_LEN, FRAME_MAGIC, KIND_DATA, PROTOCOL_VERSION};
use serde::{Deserialize, Serialize};

/// Compressed data frames.
pub const KIND_ZSTD: u16 = 3;
/// Bytes of a kind-3 payload before the zstd frame (the uncompressed length).
pub const ZSTD_PREFIX: usize = 4;
/// The bytes compressed first to decide whether a chunk is worth compressing.
pub const SAMPLE: usize = 64 << 10;
/// In this many pieces spread over the chunk.
pub const SAMPLE_PIECES: usize = 4;
/// The level when the resource's setting names none: fast, as MARS and DRBD
/// proxies use on the link.
pub const DEFAULT_LEVEL: i32 = 1;
/// Levels a resource may set (zstd's "ultra" levels above 19 need hundreds of
/// MiB on the sending side).
pub const MAX_LEVEL: i32 = 19;

/// A codec of data frames a requester accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Codec {
    Zstd,
}

/// A data frame ready to send: its header (and, compressed, the length
/// prefix), and where its body is (the caller's data, or [`Packer::body`]).
#[derive(Clone, Copy, Debug)]
pub struct Packed {
    head: [u8; FRAME_HEADER_LEN + ZSTD_PREFIX],
    compressed: bool,
    raw_len: usize,
    body_len: usize,
}

impl Packed {
    /// The raw frame of `data` (kind 2).
    pub fn raw(data: &[u8]) -> Packed {
        Packed::raw_with_crc(data, crc32c::crc32c(data))
    }

    fn raw_with_crc(data: &[u8], crc: u32) -> Packed {
        let mut head = [0u8; FRAME_HEADER_LEN + ZSTD_PREFIX];
        put_header(&mut head, KIND_DATA, data.len() as u32, crc);
        Packed {
            head,
            compressed: false,
            raw_len: data.len(),
            body_len: data.len(),
        }
    }

    /// The bytes before the body.
    pub fn head(&self) -> &[u8] {
        if self.compressed {
            &self.head
        } else {
            &self.head[..FRAME_HEADER_LEN]
        }
    }

    pub fn compressed(&self) -> bool {
        self.compressed
    }

    /// The bytes of data this frame carries.
    pub fn raw_len(&self) -> usize {
        self.raw_len
    }

    /// The frame's length on the wire (header included).
    pub fn wire_len(&self) -> usize {
        self.head().len() + self.body_len
    }
}

fn put_header(h: &mut [u8], kind: u16, len: u32, crc: u32) {
    h[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    h[6..8].copy_from_slice(&kind.to_le_bytes());
    h[8..12].copy_from_slice(&len.to_le_bytes());
    h[12..16].copy_from_slice(&crc.to_le_bytes());
}

/// The sending side of compressed data frames: a zstd context and an output
/// buffer, both used again (one per stream, or pooled).
pub struct Packer {
    cctx: zstd::bulk::Compressor<'static>,
    out: Vec<u8>,
    level: i32,
}

impl Packer {
    /// A packer at `level` (clamped to 1..=[`MAX_LEVEL`]).
    pub fn new(level: i32) -> Result<Packer, ProtoError> {
        let level = level.clamp(1, MAX_LEVEL);
        let cctx = zstd::bulk::Compressor::new(level)
            .map_err(|e| ProtoError::Compress(format!("zstd context: {e}")))?;
        Ok(Packer {
            cctx,
            out: Vec::new(),
            level,
        })
    }

    pub fn level(&self) -> i32 {
        self.level
    }

    /// Set the level for the next chunks (clamped as in [`Packer::new`]).
    pub fn set_level(&mut self, level: i32) {
        let level = level.clamp(1, MAX_LEVEL);
        if level != self.level && self.cctx.set_compression_level(level).is_ok() {
            self.level = level;
        }
    }

    /// The frame that carries `data`: compressed (its body then in
    /// [`Packer::body`]) when that makes it smaller, else raw.
    pub fn pack(&mut self, data: &[u8]) -> Packed {
        let crc = crc32c::crc32c(data);
        // Too small to gain anything after the prefix and zstd's frame header.
        if data.len() < 64 || data.len() > crate::MAX_PAYLOAD as usize {
            return Packed::raw_with_crc(data, crc);
        }
        // Most of what does not compress is told by a sample: SAMPLE bytes
        // in pieces spread over the chunk, which must shrink by 1/16.
        if data.len() > 2 * SAMPLE {
            let piece = SAMPLE / SAMPLE_PIECES;
            let room = piece - piece / 16;
            if self.out.len() < room * SAMPLE_PIECES {
                self.out.resize(room * SAMPLE_PIECES, 0);
            }
            let mut packed = 0;
            for i in 0..SAMPLE_PIECES {
                let at = (data.len() - piece) / (SAMPLE_PIECES - 1) * i;
                match self
                    .cctx
                    .compress_to_buffer(&data[at..at + piece], &mut self.out[..piece])
                {
                    Ok(n) => packed += n,
                    Err(_) => packed += piece,
                }
            }
            if packed > room * SAMPLE_PIECES {
                return Packed::raw_with_crc(data, crc);
            }
        }
        // Smaller than the raw payload, or not at all.
        let room = data.len() - ZSTD_PREFIX - 1;
        if self.out.len() < room {
            self.out.resize(room, 0);
        }
        let n = match self.cctx.compress_to_buffer(data, &mut self.out[..room]) {
            Ok(n) => n,
            Err(_) => return Packed::raw_with_crc(data, crc),
        };
        let mut head = [0u8; FRAME_HEADER_LEN + ZSTD_PREFIX];
        put_header(&mut head, KIND_ZSTD, (ZSTD_PREFIX + n) as u32, crc);
        head[FRAME_HEADER_LEN..].copy_from_slice(&(data.len() as u32).to_le_bytes());
        Packed {
            head,
            compressed: true,
            raw_len: data.len(),
            body_len: n,
        }
    }

    /// The body of `p` (made by the last [`Packer::pack`]): the compressed
    /// bytes, or `data` itself when it went raw.
    pub fn body<'a>(&'a self, p: &Packed, data: &'a [u8]) -> &'a [u8] {
        if p.compressed {
            &self.out[..p.body_len]
        } else {
            data
        }
    }

    /// The whole frame of `p` in one buffer (tests, fuzz seeds).
    pub fn frame_bytes(&self, p: &Packed, data: &[u8]) -> Vec<u8> {
        let mut f = p.head().to_vec();
        f.extend_from_slice(self.body(p, data));
        f
    }
}

/// The receiving side: a zstd context and a buffer for compressed payloads,
/// both used again.
#[derive(Default)]
pub struct Unpacker {
    dctx: Option<zstd::bulk::Decompressor<'static>>,
    scratch: Vec<u8>,
}

impl Unpacker {
    pub fn new() -> Unpacker {
        Unpacker::default()
    }

    /// A buffer of `len` bytes for a compressed payload the caller reads
    /// into before [`Unpacker::unpack_scratch`]. The caller has checked `len`
    /// against its room ([`check_zstd_len`]).
    pub fn scratch(&mut self, len: usize) -> &mut [u8] {
        if self.scratch.len() < len {
            self.scratch.resize(len, 0);
        }
        &mut self.scratch[..len]
    }

    /// Decompress the kind-3 payload of `len` bytes in the scratch buffer into
    /// the front of `out`; checks length and `crc`. Returns the data's length.
    pub fn unpack_scratch(
        &mut self,
        len: usize,
        crc: u32,
        out: &mut [u8],
    ) -> Result<usize, ProtoError> {
        let scratch = std::mem::take(&mut self.scratch);
        let r = self.unpack(&scratch[..len.min(scratch.len())], crc, out);
        self.scratch = scratch;
        r
    }

    /// Decompress the kind-3 `payload` (length prefix and zstd frame) into
    /// the front of `out`, which bounds it; checks the length and `crc`.
    pub fn unpack(
        &mut self,
        payload: &[u8],
        crc: u32,
        out: &mut [u8],
    ) -> Result<usize, ProtoError> {
        check_zstd_len(payload.len(), out.len())?;
        let announced =
            u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]) as usize;
        if announced > out.len() {
            return Err(ProtoError::Compress(format!(
                "announces {announced} bytes where at most {} were asked for",
                out.len()
            )));
        }
        if self.dctx.is_none() {
            let d = zstd::bulk::Decompressor::new()
                .map_err(|e| ProtoError::Compress(format!("zstd context: {e}")))?;
            self.dctx = Some(d);
        }
        let Some(d) = self.dctx.as_mut() else {
            return Err(ProtoError::Compress("no zstd context".into()));
        };
        // zstd writes only into these `announced` bytes: a frame that would
        // decompress to more fails here.
        let got = d
            .decompress_to_buffer(&payload[ZSTD_PREFIX..], &mut out[..announced])
            .map_err(|e| {
                // The context may be left mid-frame: a fresh one next time.
                self.dctx = None;
                ProtoError::Compress(format!("zstd: {e} (announced {announced} bytes)"))
            })?;
        if got != announced {
            return Err(ProtoError::Compress(format!(
                "decompressed to {got} bytes, announced {announced}"
            )));
        }
        if crc32c::crc32c(&out[..got]) != crc {
            return Err(ProtoError::BadChecksum);
        }
        Ok(got)
    }
}

/// A kind-3 payload of `len` bytes for a receiver with `room` bytes: at least
/// the prefix, and never larger than the data it may carry (the sender
/// compresses only what gets smaller), checked before it is read.
pub fn check_zstd_len(len: usize, room: usize) -> Result<(), ProtoError> {
    if len < ZSTD_PREFIX {
        return Err(ProtoError::Compress(format!(
            "a compressed payload of {len} bytes has no length"
        )));
    }
    if len > room {
        return Err(ProtoError::Compress(format!(
            "a compressed payload of {len} bytes where at most {room} bytes of data were asked for"
        )));
    }
    Ok(())
}

/// Decode one whole data frame (kind 2 or 3) from `frame` into the front of
/// `out` (which bounds it): the data's length. For tests and fuzzing; the
/// streams read with [`crate::read_data_packed`].
pub fn decode_data_frame(
    frame: &[u8],
    out: &mut [u8],
    unpacker: &mut Unpacker,
) -> Result<usize, ProtoError> {
    let (kind, len, crc) = crate::parse_frame_header_kind(frame)?;
    let len = len as usize;
    let Some(payload) = frame.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + len) else {
        return Err(ProtoError::Decode(format!(
            "short frame: need {} bytes, have {}",
            FRAME_HEADER_LEN + len,
            frame.len()
        )));
    };
    match kind {
        KIND_DATA => {
            if len > out.len() {
                return Err(ProtoError::Unexpected(format!(
                    "a data frame of {len} bytes where at most {} were asked for",
                    out.len()
                )));
            }
            if crc32c::crc32c(payload) != crc {
                return Err(ProtoError::BadChecksum);
            }
            out[..len].copy_from_slice(payload);
            Ok(len)
        }
        KIND_ZSTD => unpacker.unpack(payload, crc, out),
        k => Err(ProtoError::Unexpected(format!(
            "a frame of kind {k} where data belongs"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn text(n: usize) -> Vec<u8> {
        let words = b"replicated block device log record payload mars zstd ";
        (0..n)
            .map(|i| words[(i * 7 + i / 13) % words.len()])
            .collect()
    }

    fn random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn compressible_data_goes_compressed_and_comes_back() {
        let mut p = Packer::new(DEFAULT_LEVEL).unwrap();
        let data = text(1 << 20);
        let packed = p.pack(&data);
        assert!(packed.compressed());
        assert!(packed.wire_len() < data.len() / 4, "{}", packed.wire_len());
        let f = p.frame_bytes(&packed, &data);
        let mut out = vec![0u8; 1 << 20];
        let mut u = Unpacker::new();
        assert_eq!(decode_data_frame(&f, &mut out, &mut u).unwrap(), data.len());
        assert_eq!(out, data);
    }

    #[test]
    fn random_data_goes_raw_and_zeros_go_tiny() {
        let mut p = Packer::new(3).unwrap();
        for len in [100, 4096, SAMPLE, 3 * SAMPLE, 4 << 20] {
            let data = random(len, len as u64);
            let packed = p.pack(&data);
            assert!(!packed.compressed(), "{len}");
            assert_eq!(packed.wire_len(), FRAME_HEADER_LEN + len);
            let mut out = vec![0u8; len];
            let f = p.frame_bytes(&packed, &data);
            assert_eq!(
                decode_data_frame(&f, &mut out, &mut Unpacker::new()).unwrap(),
                len
            );
            assert_eq!(out, data);
        }
        // A compressible piece in random data: compression is tried and
        // given up where the result would not be smaller.
        let mut data = random(8 * SAMPLE, 9);
        data[..SAMPLE].fill(0);
        data[7 * SAMPLE..].fill(0);
        let packed = p.pack(&data);
        assert!(packed.compressed(), "a quarter of it compresses");
        assert!(packed.wire_len() < 7 * SAMPLE);
        let zeros = vec![0u8; 4 << 20];
        let packed = p.pack(&zeros);
        assert!(packed.compressed() && packed.wire_len() < 1024);
        assert_eq!(p.pack(&[0u8; 10]).wire_len(), FRAME_HEADER_LEN + 10);
    }

    /// A compressed frame of `data` whose announced length is `announce`.
    fn forged(data: &[u8], announce: u32) -> Vec<u8> {
        let mut p = Packer::new(1).unwrap();
        let packed = p.pack(data);
        assert!(packed.compressed());
        let mut f = p.frame_bytes(&packed, data);
        f[16..20].copy_from_slice(&announce.to_le_bytes());
        f
    }

    #[test]
    fn damaged_and_oversized_frames_are_refused() {
        let data = text(100_000);
        let mut u = Unpacker::new();
        let mut out = vec![0u8; 100_000];
        // Decompresses to more than announced: zstd stops at the room given.
        let f = forged(&data, 99_999);
        assert!(matches!(
            decode_data_frame(&f, &mut out, &mut u),
            Err(ProtoError::Compress(_))
        ));
        // Announces more than it holds.
        let mut big = vec![0u8; 200_000];
        let f = forged(&data, 100_001);
        assert!(matches!(
            decode_data_frame(&f, &mut big, &mut u),
            Err(ProtoError::Compress(m)) if m.contains("decompressed to 100000")
        ));
        // Announces more than the receiver asked for: refused before zstd.
        assert!(matches!(
            decode_data_frame(&f, &mut out, &mut u),
            Err(ProtoError::Compress(m)) if m.contains("announces 100001")
        ));
        // The crc covers the uncompressed bytes.
        let mut p = Packer::new(1).unwrap();
        let packed = p.pack(&data);
        let mut f = p.frame_bytes(&packed, &data);
        f[12] ^= 1;
        assert!(matches!(
            decode_data_frame(&f, &mut out, &mut u),
            Err(ProtoError::BadChecksum)
        ));
        // A flipped byte in the zstd frame: an error of zstd or of the crc.
        for at in [20, 25, f.len() / 2, f.len() - 1] {
            let mut g = p.frame_bytes(&packed, &data);
            g[at] ^= 0x40;
            assert!(decode_data_frame(&g, &mut out, &mut u).is_err(), "{at}");
        }
        // And the unpacker works after all that.
        let g = p.frame_bytes(&packed, &data);
        assert_eq!(decode_data_frame(&g, &mut out, &mut u).unwrap(), 100_000);
        // A payload larger than the room, and one without a length.
        let mut small = vec![0u8; 10];
        assert!(matches!(
            decode_data_frame(&g, &mut small, &mut u),
            Err(ProtoError::Compress(m)) if m.contains("at most 10")
        ));
        let mut h = g[..FRAME_HEADER_LEN].to_vec();
        h[8..12].copy_from_slice(&2u32.to_le_bytes());
        h.extend_from_slice(&[0, 0]);
        assert!(decode_data_frame(&h, &mut out, &mut u).is_err());
        // Truncated.
        assert!(decode_data_frame(&g[..g.len() - 1], &mut out, &mut u).is_err());
    }

    proptest! {
        #[test]
        fn round_trip(
            chunks in proptest::collection::vec(
                (0usize..3, 0usize..300_000, any::<u64>()), 1..4),
            level in 1i32..6,
        ) {
            let mut p = Packer::new(level).unwrap();
            let mut u = Unpacker::new();
            for (shape, len, seed) in chunks {
                let data = match shape {
                    0 => text(len),
                    1 => random(len, seed),
                    _ => {
                        let mut d = text(len / 2);
                        d.extend(random(len - len / 2, seed));
                        d
                    }
                };
                let packed = p.pack(&data);
                prop_assert!(packed.wire_len() <= FRAME_HEADER_LEN + data.len());
                let f = p.frame_bytes(&packed, &data);
                let mut out = vec![0u8; len];
                prop_assert_eq!(decode_data_frame(&f, &mut out, &mut u).unwrap(), len);
                prop_assert_eq!(&out, &data);
            }
        }

        #[test]
        fn damage_is_an_error_never_a_panic_or_wrong_data(
            len in 1000usize..50_000,
            flips in proptest::collection::vec((any::<usize>(), 1u8..=255), 1..4),
            room in 0usize..60_000,
        ) {
            let data = text(len);
            let mut p = Packer::new(1).unwrap();
            let packed = p.pack(&data);
            let mut f = p.frame_bytes(&packed, &data);
            for (at, x) in flips {
                let at = at % f.len();
                f[at] ^= x;
            }
            let mut out = vec![0u8; room];
            if let Ok(n) = decode_data_frame(&f, &mut out, &mut Unpacker::new()) {
                // Only a flip that changed nothing the crc covers, e.g. none in
                // the data: what comes out is the data.
                prop_assert_eq!(&out[..n], &data[..]);
            }
        }

        #[test]
        fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400), room in 0usize..1000) {
            let mut out = vec![0u8; room];
            let _ = decode_data_frame(&bytes, &mut out, &mut Unpacker::new());
            // And behind a valid header of kind 3.
            let mut f = Vec::new();
            let mut head = [0u8; FRAME_HEADER_LEN];
            put_header(&mut head, KIND_ZSTD, bytes.len() as u32, 0);
            f.extend_from_slice(&head);
            f.extend_from_slice(&bytes);
            let _ = decode_data_frame(&f, &mut out, &mut Unpacker::new());
        }
    }
}
