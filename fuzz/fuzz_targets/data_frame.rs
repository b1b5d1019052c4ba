//! The peer protocol's data-frame decoder (raw kind 2, zstd kind 3) on
//! arbitrary bytes, into a room of a size the input picks, and the packer's
//! round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mars_proto::codec::{decode_data_frame, Packer, Unpacker, KIND_ZSTD};
use mars_proto::{FRAME_HEADER_LEN, FRAME_MAGIC, PROTOCOL_VERSION};

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    // Bytes 0-1: the room the receiver asked for (up to 1 MiB); byte 2, low
    // bit: the rest is a kind-3 payload behind a valid header (so that the
    // fuzzer reaches zstd at once), else a whole frame.
    let room = (u16::from_le_bytes([data[0], data[1]]) as usize) << 4;
    let rest = &data[3..];
    let frame = if data[2] & 1 == 1 {
        let mut f = Vec::with_capacity(FRAME_HEADER_LEN + rest.len());
        f.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
        f.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        f.extend_from_slice(&KIND_ZSTD.to_le_bytes());
        f.extend_from_slice(&(rest.len() as u32).to_le_bytes());
        f.extend_from_slice(&0u32.to_le_bytes());
        f.extend_from_slice(rest);
        f
    } else {
        rest.to_vec()
    };
    let mut out = vec![0u8; room];
    let mut u = Unpacker::new();
    if let Ok(n) = decode_data_frame(&frame, &mut out, &mut u) {
        assert!(n <= room, "decoded {n} bytes into a room of {room}");
        let crc = u32::from_le_bytes([frame[12], frame[13], frame[14], frame[15]]);
        assert_eq!(crc32c::crc32c(&out[..n]), crc, "the crc covers what came out");
    }

    // The packer: whatever it sends decodes to the same bytes, and never
    // takes more room than raw.
    let level = i32::from(data[2] >> 4) + 1;
    let Ok(mut p) = Packer::new(level) else {
        return;
    };
    let packed = p.pack(rest);
    assert!(packed.wire_len() <= FRAME_HEADER_LEN + rest.len());
    let f = p.frame_bytes(&packed, rest);
    let mut back = vec![0u8; rest.len()];
    let n = decode_data_frame(&f, &mut back, &mut u).expect("a packed frame decodes");
    assert_eq!(&back[..n], rest);
});
