//! Writes the seed corpora under `fuzz/seeds/<target>/` (each file < 4 KiB).
//!
//! Run from `fuzz/`: `cargo run --example gen_seeds` (a plain build, no
//! sanitizers). The output is deterministic; the files are committed.

use std::fs;
use std::path::{Path, PathBuf};

use mars_logfmt::{FileHeader, Kind, RecordHeader, VersionBuilder};
use mars_nbd::proto::*;
use mars_nbd::{Command, Request};

fn out_dir(target: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target);
    fs::create_dir_all(&d).unwrap();
    d
}

fn put(target: &str, name: &str, bytes: &[u8]) {
    assert!(
        bytes.len() < 4096,
        "seed {target}/{name} is {} bytes",
        bytes.len()
    );
    fs::write(out_dir(target).join(name), bytes).unwrap();
}

fn record(kind: Kind, seq: u64, pos: u64, offset: u64, length: u64, fill: u8) -> Vec<u8> {
    let h = RecordHeader {
        kind,
        seq,
        pos,
        offset,
        length,
        stamp_ns: 1_700_000_000_000_000_000,
        durable_back: 0,
    };
    let payload = vec![fill; h.payload_len() as usize];
    let mut out = Vec::new();
    h.encode_into(&payload, &mut out);
    out
}

fn file_header(start_pos: u64, start_record_seq: u64) -> FileHeader {
    FileHeader {
        file_seq: 2,
        start_pos,
        start_record_seq,
        created_ns: 5,
        resource_id: 0xfeed_beef,
        parent: 0,
    }
}

/// A logfile: header then `n` records continuing the stream.
fn logfile(start_pos: u64, start_seq: u64, n: u64) -> Vec<u8> {
    let mut buf = file_header(start_pos, start_seq).encode().to_vec();
    let mut pos = start_pos;
    for i in 0..n {
        let (kind, len) = match i % 3 {
            0 => (Kind::Write, 100 + i * 7),
            1 => (Kind::Trim, 4096),
            _ => (Kind::WriteZeroes, 512),
        };
        let r = record(kind, start_seq + i, pos, i * 4096, len, i as u8 + 1);
        pos += r.len() as u64;
        buf.extend_from_slice(&r);
    }
    buf
}

fn log_seeds() {
    // log_record
    put(
        "log_record",
        "write",
        &record(Kind::Write, 1, 0, 4096, 200, 0xab),
    );
    put(
        "log_record",
        "write_empty",
        &record(Kind::Write, 2, 264, 0, 0, 0),
    );
    put(
        "log_record",
        "trim",
        &record(Kind::Trim, 3, 1000, 8192, 1 << 20, 0),
    );
    put(
        "log_record",
        "write_zeroes",
        &record(Kind::WriteZeroes, 4, 2000, 0, 4096, 0),
    );
    put("log_record", "file_header", &file_header(0, 1).encode());

    // log_scan
    put("log_scan", "clean", &logfile(0, 1, 6));
    put("log_scan", "clean_far", &logfile(1 << 40, 1 << 30, 3));
    put("log_scan", "header_only", &file_header(12345, 7).encode());
    let mut torn = logfile(0, 1, 4);
    torn.truncate(torn.len() - 20);
    put("log_scan", "torn_tail", &torn);
    let mut corrupt = logfile(0, 1, 5);
    corrupt[64 + 70] ^= 0x40;
    put("log_scan", "corrupt_middle", &corrupt);
    let mut zeroes = logfile(0, 1, 2);
    zeroes.extend_from_slice(&[0u8; 600]);
    put("log_scan", "zero_tail", &zeroes);

    // log_version
    let mut b = VersionBuilder::new();
    let first = logfile(0, 1, 2);
    let mut hdr = [0u8; mars_logfmt::RECORD_HEADER_LEN];
    hdr.copy_from_slice(&first[64..128]);
    b.add_record(&hdr);
    let v1 = b.finish(None, "log-000000001-alpha", 1, 0, 500);
    let mut b = VersionBuilder::new();
    b.add_record(&[0x42; mars_logfmt::RECORD_HEADER_LEN]);
    let v2 = b.finish(Some(&v1), "log-000000002-alpha", 2, 500, 512);
    put("log_version", "version1.json", v1.to_json().as_bytes());
    put("log_version", "version2.json", v2.to_json().as_bytes());
    put("log_version", "logfile_name", b"log-000000042-node-a");
}

fn req(kind: Command, flags: u16, cookie: u64, offset: u64, length: u32) -> [u8; REQUEST_LEN] {
    encode_request(&Request {
        flags,
        kind,
        cookie,
        offset,
        length,
    })
}

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut v = encode_option_header(opt, data.len() as u32).to_vec();
    v.extend_from_slice(data);
    v
}

fn nbd_seeds() {
    // nbd_request: one input per parser.
    put(
        "nbd_request",
        "request_read",
        &req(Command::Read, 0, 1, 4096, 512),
    );
    put(
        "nbd_request",
        "request_write_fua",
        &req(Command::Write, NBD_CMD_FLAG_FUA, 2, 0, 4096),
    );
    put(
        "nbd_request",
        "option_header_go",
        &encode_option_header(NBD_OPT_GO, 10),
    );
    put(
        "nbd_request",
        "info_request",
        &encode_info_request(b"disk", &[NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME]),
    );
    put(
        "nbd_request",
        "info_request_empty",
        &encode_info_request(b"", &[]),
    );
    put(
        "nbd_request",
        "simple_reply",
        &encode_simple_reply(NBD_EINVAL, 77),
    );
    let mut rep = Vec::new();
    put_option_reply(&mut rep, NBD_OPT_GO, NBD_REP_ACK, &[]);
    put("nbd_request", "option_reply", &rep);

    // nbd_handshake: whole client conversations.
    let flags = (NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).to_be_bytes();
    let go = |name: &[u8]| {
        option(
            NBD_OPT_GO,
            &encode_info_request(name, &[NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME]),
        )
    };

    let mut s = flags.to_vec();
    s.extend(go(b"disk"));
    s.extend(req(Command::Write, 0, 1, 0, 16));
    s.extend([0x5a; 16]);
    s.extend(req(Command::Read, 0, 2, 0, 64));
    s.extend(req(Command::Write, NBD_CMD_FLAG_FUA, 3, 65536 - 8, 8));
    s.extend([0xa5; 8]);
    s.extend(req(Command::Flush, 0, 4, 0, 0));
    s.extend(req(Command::Trim, 0, 5, 4096, 4096));
    s.extend(req(
        Command::WriteZeroes,
        NBD_CMD_FLAG_NO_HOLE,
        6,
        8192,
        100,
    ));
    s.extend(req(Command::Read, 0, 7, 65536, 1)); // past the end
    s.extend(req(Command::Unknown(99), 0, 8, 0, 0));
    s.extend(req(Command::Disc, 0, 9, 0, 0));
    put("nbd_handshake", "go_transmission", &s);

    let mut s = flags.to_vec();
    s.extend(option(NBD_OPT_LIST, &[]));
    s.extend(option(
        NBD_OPT_INFO,
        &encode_info_request(b"ro", &[NBD_INFO_EXPORT]),
    ));
    s.extend(option(NBD_OPT_INFO, &encode_info_request(b"nope", &[])));
    s.extend(option(NBD_OPT_STRUCTURED_REPLY, &[]));
    s.extend(option(NBD_OPT_ABORT, &[]));
    put("nbd_handshake", "list_info_abort", &s);

    let mut s = flags.to_vec();
    s.extend(go(b"ro"));
    s.extend(req(Command::Read, 0, 1, 0, 4096));
    s.extend(req(Command::Write, 0, 2, 0, 4));
    s.extend([1, 2, 3, 4]);
    s.extend(req(Command::Trim, 0, 3, 0, 4));
    put("nbd_handshake", "go_read_only", &s);

    let mut s = NBD_FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    s.extend(option(NBD_OPT_EXPORT_NAME, b""));
    s.extend(req(Command::Read, 0, 1, 0, 512));
    s.extend(req(Command::WriteZeroes, 0, 2, 500, 12));
    put("nbd_handshake", "export_name_empty", &s);
}

/// Data frames (`data_frame`): room (u16 LE, in 16-byte units), a mode
/// byte (low bit 0: a whole frame follows), then the frame.
fn data_frame_seeds() {
    use mars_proto::codec::Packer;
    let text: Vec<u8> = (0..3000u32)
        .map(|i| b"mars replicates block devices "[i as usize % 30])
        .collect();
    let mut p = Packer::new(1).unwrap();
    let zstd = p.pack(&text);
    assert!(zstd.compressed());
    let room = ((text.len() / 16 + 1) as u16).to_le_bytes();
    let mut seed = vec![room[0], room[1], 0];
    seed.extend(p.frame_bytes(&zstd, &text));
    put("data_frame", "zstd", &seed);
    // The same payload behind the target's own header (mode bit 1).
    let f = p.frame_bytes(&zstd, &text);
    let mut seed = vec![room[0], room[1], 1];
    seed.extend_from_slice(&f[16..]);
    put("data_frame", "zstd_payload", &seed);
    let small = [7u8; 40];
    let raw = p.pack(&small);
    let mut seed = vec![4, 0, 0];
    seed.extend(p.frame_bytes(&raw, &small));
    put("data_frame", "raw", &seed);
}

fn main() {
    log_seeds();
    nbd_seeds();
    data_frame_seeds();
    println!(
        "seeds written to {}",
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("seeds")
            .display()
    );
}
