mod common;

use common::*;
use mars_nbd::proto::*;
use mars_nbd::{errno_for, NbdError};
use std::collections::HashMap;
use std::io;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

const SIZE: usize = 1 << 20;

#[tokio::test]
async fn write_read_round_trip() {
    let (reg, e) = MemRegistry::with("d", MemExport::new(SIZE));
    let (mut s, h, size, _) = connect_go(reg, "d").await;
    assert_eq!(size, SIZE as u64);
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
    assert_eq!(write(&mut s, 0, 12_345, &data).await, 0);
    assert_eq!(read(&mut s, 12_345, 10_000).await.unwrap(), data);
    assert_eq!(&e.snapshot()[12_345..22_345], &data[..]);
    // Last byte of the device.
    assert_eq!(write(&mut s, 0, SIZE as u64 - 1, &[9]).await, 0);
    assert_eq!(read(&mut s, SIZE as u64 - 1, 1).await.unwrap(), vec![9]);
    // Large (1 MiB) write and read: exercises the non-inlined reply path.
    let big: Vec<u8> = (0..SIZE).map(|i| (i % 253) as u8).collect();
    assert_eq!(write(&mut s, 0, 0, &big).await, 0);
    assert_eq!(read(&mut s, 0, SIZE as u32).await.unwrap(), big);
    disconnect(s, h).await;
}

#[tokio::test]
async fn pipelined_mixed_sizes() {
    let (reg, _e) = MemRegistry::with("d", MemExport::patterned(4 * SIZE));
    let (mut s, h, _, _) = connect_go(reg, "d").await;
    // Send many reads of mixed sizes without waiting, then collect replies by cookie.
    let reqs: Vec<(u64, u64, u32)> = (0..40u64)
        .map(|i| {
            (
                i,
                i * 65_537 % (3 * SIZE as u64),
                [512u32, 4096, 40_000, 300_000][i as usize % 4],
            )
        })
        .collect();
    for &(c, off, len) in &reqs {
        send_req(&mut s, NBD_CMD_READ, 0, c, off, len, &[]).await;
    }
    let want: HashMap<u64, (u64, u32)> = reqs.iter().map(|&(c, o, l)| (c, (o, l))).collect();
    for _ in 0..reqs.len() {
        let (err, cookie) = read_reply(&mut s).await;
        assert_eq!(err, 0);
        let (off, len) = want[&cookie];
        let d = read_data(&mut s, len as usize).await;
        for (i, b) in d.iter().enumerate() {
            assert_eq!(*b, ((off as usize + i) % 251) as u8);
        }
    }
    disconnect(s, h).await;
}

#[tokio::test]
async fn fua_and_flush() {
    let (reg, e) = MemRegistry::with("d", MemExport::new(SIZE));
    let (mut s, h, _, _) = connect_go(reg, "d").await;
    assert_eq!(write(&mut s, NBD_CMD_FLAG_FUA, 0, &[1; 4096]).await, 0);
    assert_eq!(e.fua_ops.load(Ordering::SeqCst), 1);
    assert_eq!(write(&mut s, 0, 4096, &[1; 4096]).await, 0);
    assert_eq!(e.fua_ops.load(Ordering::SeqCst), 1);
    assert_eq!(simple_cmd(&mut s, NBD_CMD_FLUSH, 0, 0, 0).await, 0);
    assert_eq!(e.flushes.load(Ordering::SeqCst), 1);
    // FUA is accepted on flush and read too.
    assert_eq!(
        simple_cmd(&mut s, NBD_CMD_FLUSH, NBD_CMD_FLAG_FUA, 0, 0).await,
        0
    );
    assert_eq!(e.flushes.load(Ordering::SeqCst), 2);
    send_req(&mut s, NBD_CMD_READ, NBD_CMD_FLAG_FUA, 3, 0, 16, &[]).await;
    assert_eq!(read_reply(&mut s).await, (0, 3));
    assert_eq!(read_data(&mut s, 16).await, vec![1; 16]);
    // Flush with nonzero offset/length is invalid.
    assert_eq!(
        simple_cmd(&mut s, NBD_CMD_FLUSH, 0, 512, 0).await,
        NBD_EINVAL
    );
    assert_eq!(
        simple_cmd(&mut s, NBD_CMD_FLUSH, 0, 0, 512).await,
        NBD_EINVAL
    );
    assert_eq!(e.flushes.load(Ordering::SeqCst), 2);
    disconnect(s, h).await;
}

#[tokio::test]
async fn trim_and_write_zeroes() {
    let (reg, e) = MemRegistry::with("d", MemExport::patterned(SIZE));
    let (mut s, h, _, _) = connect_go(reg, "d").await;
    assert_eq!(simple_cmd(&mut s, NBD_CMD_TRIM, 0, 4096, 8192).await, 0);
    assert_eq!(e.trims.load(Ordering::SeqCst), 1);
    assert_eq!(
        simple_cmd(&mut s, NBD_CMD_WRITE_ZEROES, 0, 65536, 4096).await,
        0
    );
    assert_eq!(
        simple_cmd(
            &mut s,
            NBD_CMD_WRITE_ZEROES,
            NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FUA,
            100_000,
            1000
        )
        .await,
        0
    );
    assert_eq!(e.zeroes.load(Ordering::SeqCst), 2);
    assert_eq!(e.fua_ops.load(Ordering::SeqCst), 1);
    assert_eq!(read(&mut s, 65536, 4096).await.unwrap(), vec![0; 4096]);
    assert_eq!(read(&mut s, 100_000, 1000).await.unwrap(), vec![0; 1000]);
    // Untouched neighbour.
    assert_eq!(
        read(&mut s, 100_000 + 1000, 1).await.unwrap(),
        vec![((101_000) % 251) as u8]
    );
    // FAST_ZERO is not advertised -> EINVAL.
    assert_eq!(
        simple_cmd(&mut s, NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FAST_ZERO, 0, 512).await,
        NBD_EINVAL
    );
    assert_eq!(e.zeroes.load(Ordering::SeqCst), 2);
    disconnect(s, h).await;
}

#[tokio::test]
async fn out_of_range_requests_leave_data_untouched() {
    let (reg, e) = MemRegistry::with("d", MemExport::patterned(SIZE));
    let (mut s, h, _, _) = connect_go(reg, "d").await;
    let before = e.snapshot();
    let calls = e.backend_calls();
    let end = SIZE as u64;

    assert_eq!(read(&mut s, end - 10, 11).await, Err(NBD_EINVAL));
    assert_eq!(read(&mut s, end + 1, 0).await, Err(NBD_EINVAL));
    assert_eq!(read(&mut s, u64::MAX, 1).await, Err(NBD_EINVAL));
    assert_eq!(write(&mut s, 0, end - 2, &[1, 2, 3]).await, NBD_ENOSPC);
    assert_eq!(write(&mut s, 0, u64::MAX - 1, &[1, 2, 3]).await, NBD_ENOSPC);
    assert_eq!(
        simple_cmd(&mut s, NBD_CMD_WRITE_ZEROES, 0, end, 1).await,
        NBD_ENOSPC
    );
    assert_eq!(
        simple_cmd(&mut s, NBD_CMD_WRITE_ZEROES, 0, u64::MAX, u32::MAX).await,
        NBD_ENOSPC
    );
    assert_eq!(
        simple_cmd(&mut s, NBD_CMD_TRIM, 0, end - 1, 2).await,
        NBD_EINVAL
    );
    assert_eq!(
        simple_cmd(&mut s, NBD_CMD_TRIM, 0, u64::MAX, 1).await,
        NBD_EINVAL
    );
    // READ over 32 MiB.
    assert_eq!(read(&mut s, 0, (32 << 20) + 1).await, Err(NBD_EINVAL));

    assert_eq!(e.snapshot(), before);
    assert_eq!(e.backend_calls(), calls);
    // Connection still usable.
    assert_eq!(
        read(&mut s, end - 1, 1).await.unwrap(),
        vec![((end - 1) % 251) as u8]
    );
    disconnect(s, h).await;
}

#[tokio::test]
async fn unknown_commands_and_flags_einval() {
    let (reg, e) = MemRegistry::with("d", MemExport::patterned(SIZE));
    let (mut s, h, _, _) = connect_go(reg, "d").await;
    let before = e.snapshot();
    for kind in [
        NBD_CMD_CACHE,
        NBD_CMD_BLOCK_STATUS,
        NBD_CMD_RESIZE,
        9,
        200,
        u16::MAX,
    ] {
        assert_eq!(
            simple_cmd(&mut s, kind, 0, 0, 512).await,
            NBD_EINVAL,
            "cmd {kind}"
        );
    }
    // DF is not valid without structured replies; unknown bits never are.
    send_req(&mut s, NBD_CMD_READ, NBD_CMD_FLAG_DF, 1, 0, 512, &[]).await;
    assert_eq!(read_reply(&mut s).await, (NBD_EINVAL, 1));
    send_req(&mut s, NBD_CMD_READ, 0x8000, 2, 0, 512, &[]).await;
    assert_eq!(read_reply(&mut s).await, (NBD_EINVAL, 2));
    assert_eq!(
        simple_cmd(&mut s, NBD_CMD_TRIM, NBD_CMD_FLAG_NO_HOLE, 0, 512).await,
        NBD_EINVAL
    );
    // WRITE with a bad flag: payload consumed, EINVAL, data untouched.
    assert_eq!(
        write(&mut s, NBD_CMD_FLAG_REQ_ONE, 0, &[0xee; 1000]).await,
        NBD_EINVAL
    );
    assert_eq!(e.snapshot(), before);
    assert_eq!(e.backend_calls(), 0);
    assert_eq!(read(&mut s, 0, 4).await.unwrap(), vec![0, 1, 2, 3]);
    disconnect(s, h).await;
}

#[tokio::test]
async fn zero_length_requests_succeed_without_backend() {
    let (reg, e) = MemRegistry::with("d", MemExport::new(SIZE));
    let (mut s, h, _, _) = connect_go(reg, "d").await;
    assert_eq!(read(&mut s, 100, 0).await.unwrap(), Vec::<u8>::new());
    assert_eq!(write(&mut s, 0, 100, &[]).await, 0);
    assert_eq!(simple_cmd(&mut s, NBD_CMD_TRIM, 0, 100, 0).await, 0);
    assert_eq!(
        simple_cmd(&mut s, NBD_CMD_WRITE_ZEROES, 0, SIZE as u64, 0).await,
        0
    );
    assert_eq!(e.backend_calls(), 0);
    disconnect(s, h).await;
}

#[tokio::test]
async fn read_only_export_rejects_writes_with_eperm() {
    let ex = MemExport::patterned(SIZE);
    ex.read_only.store(true, Ordering::SeqCst);
    let (reg, e) = MemRegistry::with("ro", ex);
    let (mut s, h, _, flags) = connect_go(reg, "ro").await;
    assert_ne!(flags & NBD_FLAG_READ_ONLY, 0);
    let before = e.snapshot();
    assert_eq!(write(&mut s, 0, 0, &[7; 4096]).await, NBD_EPERM);
    assert_eq!(
        simple_cmd(&mut s, NBD_CMD_TRIM, 0, 0, 4096).await,
        NBD_EPERM
    );
    assert_eq!(
        simple_cmd(&mut s, NBD_CMD_WRITE_ZEROES, 0, 0, 4096).await,
        NBD_EPERM
    );
    assert_eq!(simple_cmd(&mut s, NBD_CMD_FLUSH, 0, 0, 0).await, 0);
    assert_eq!(e.snapshot(), before);
    assert_eq!(read(&mut s, 0, 3).await.unwrap(), vec![0, 1, 2]);
    disconnect(s, h).await;
}

#[tokio::test]
async fn bad_request_magic_closes_connection() {
    let (reg, _) = MemRegistry::with("d", MemExport::new(SIZE));
    let (mut s, h, _, _) = connect_go(reg, "d").await;
    let mut b = encode_request(&Request {
        flags: 0,
        kind: mars_nbd::Command::Read,
        cookie: 1,
        offset: 0,
        length: 512,
    });
    b[3] ^= 0xff;
    s.write_all(&b).await.unwrap();
    expect_eof(&mut s).await;
    assert!(matches!(
        finish(h).await,
        Err(NbdError::Proto(ProtoError::BadMagic(_)))
    ));
}

#[tokio::test]
async fn oversized_write_closes_connection() {
    let (reg, e) = MemRegistry::with("d", MemExport::new(SIZE));
    let (mut s, h, _, _) = connect_go(reg, "d").await;
    send_req(&mut s, NBD_CMD_WRITE, 0, 1, 0, (32 << 20) + 1, &[]).await;
    expect_eof(&mut s).await;
    assert!(matches!(finish(h).await, Err(NbdError::PayloadTooLarge(_))));
    assert_eq!(e.backend_calls(), 0);
}

#[tokio::test]
async fn concurrent_requests_complete_out_of_order() {
    let mut ex = MemExport::patterned(SIZE);
    // Reads in the first half are slow.
    ex.read_delay = Some(Box::new(|off| {
        (off < SIZE as u64 / 2).then(|| Duration::from_millis(300))
    }));
    let (reg, _) = MemRegistry::with("d", ex);
    let (mut s, h, _, _) = connect_go(reg, "d").await;
    let n = 64u64;
    let t0 = Instant::now();
    for c in 0..n {
        // Even cookies slow, odd cookies fast.
        let off = if c % 2 == 0 {
            c * 4096
        } else {
            SIZE as u64 / 2 + c * 4096
        };
        send_req(&mut s, NBD_CMD_READ, 0, 1000 + c, off, 4096, &[]).await;
    }
    let mut order = vec![];
    for _ in 0..n {
        let (err, cookie) = read_reply(&mut s).await;
        assert_eq!(err, 0);
        let c = cookie - 1000;
        let off = if c % 2 == 0 {
            c * 4096
        } else {
            SIZE as u64 / 2 + c * 4096
        };
        let d = read_data(&mut s, 4096).await;
        assert!(d
            .iter()
            .enumerate()
            .all(|(i, &b)| b == ((off as usize + i) % 251) as u8));
        order.push(c);
    }
    let elapsed = t0.elapsed();
    // All fast replies arrive before any slow one.
    assert!(
        order[..(n as usize / 2)].iter().all(|c| c % 2 == 1),
        "order: {order:?}"
    );
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(sorted, (0..n).collect::<Vec<_>>());
    // 32 slow reads of 300 ms ran concurrently.
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
    disconnect(s, h).await;
}

#[tokio::test]
async fn disc_finishes_in_flight_requests() {
    let mut ex = MemExport::patterned(SIZE);
    ex.read_delay = Some(Box::new(|_| Some(Duration::from_millis(200))));
    let (reg, _) = MemRegistry::with("d", ex);
    let (mut s, h, _, _) = connect_go(reg, "d").await;
    for c in 0..8u64 {
        send_req(&mut s, NBD_CMD_READ, 0, c, c * 512, 512, &[]).await;
    }
    send_req(&mut s, NBD_CMD_DISC, 0, 99, 0, 0, &[]).await;
    let mut got = vec![];
    for _ in 0..8 {
        let (err, c) = read_reply(&mut s).await;
        assert_eq!(err, 0);
        read_data(&mut s, 512).await;
        got.push(c);
    }
    got.sort();
    assert_eq!(got, (0..8).collect::<Vec<_>>());
    expect_eof(&mut s).await;
    finish(h).await.unwrap();
}

#[tokio::test]
async fn client_eof_is_clean() {
    let (reg, _) = MemRegistry::with("d", MemExport::new(SIZE));
    let (s, h, _, _) = connect_go(reg, "d").await;
    drop(s);
    // Either clean or a write error on the closed pipe; it must not hang or panic.
    let _ = finish(h).await;
}

#[tokio::test]
async fn export_gone_replies_eshutdown_and_closes() {
    let (reg, e) = MemRegistry::with("d", MemExport::new(SIZE));
    let (mut s, h, _, _) = connect_go(reg, "d").await;
    assert_eq!(write(&mut s, 0, 0, &[1; 512]).await, 0);
    *e.fail_writes.lock().unwrap() = Some(io::ErrorKind::NotConnected);
    assert_eq!(write(&mut s, 0, 0, &[2; 512]).await, NBD_ESHUTDOWN);
    expect_eof(&mut s).await;
    finish(h).await.unwrap();
}

#[tokio::test]
async fn backend_errors_are_mapped() {
    let (reg, e) = MemRegistry::with("d", MemExport::new(SIZE));
    let (mut s, h, _, _) = connect_go(reg, "d").await;
    for (kind, errno) in [
        (io::ErrorKind::Other, NBD_EIO),
        (io::ErrorKind::PermissionDenied, NBD_EPERM),
        (io::ErrorKind::InvalidInput, NBD_EINVAL),
    ] {
        *e.fail_writes.lock().unwrap() = Some(kind);
        assert_eq!(write(&mut s, 0, 0, &[2; 512]).await, errno);
    }
    disconnect(s, h).await;
}

#[test]
fn errno_mapping() {
    let k = |k: io::ErrorKind| errno_for(&io::Error::from(k));
    let os = |c: i32| errno_for(&io::Error::from_raw_os_error(c));
    assert_eq!(k(io::ErrorKind::NotConnected), NBD_ESHUTDOWN);
    assert_eq!(k(io::ErrorKind::BrokenPipe), NBD_ESHUTDOWN);
    assert_eq!(k(io::ErrorKind::PermissionDenied), NBD_EPERM);
    assert_eq!(k(io::ErrorKind::InvalidInput), NBD_EINVAL);
    assert_eq!(k(io::ErrorKind::Other), NBD_EIO);
    assert_eq!(k(io::ErrorKind::UnexpectedEof), NBD_EIO);
    assert_eq!(os(28), NBD_ENOSPC); // ENOSPC
    assert_eq!(os(122), NBD_ENOSPC); // EDQUOT
    assert_eq!(os(27), NBD_ENOSPC); // EFBIG
    assert_eq!(os(30), NBD_EPERM); // EROFS
    assert_eq!(os(1), NBD_EPERM);
    assert_eq!(os(5), NBD_EIO);
    assert_eq!(os(12), NBD_EIO); // ENOMEM is never sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_writes_and_reads_multithreaded() {
    let (reg, e) = MemRegistry::with("d", MemExport::new(4 * SIZE));
    let (s, h, _, _) = connect_go(reg, "d").await;
    // 512 pipelined 4 KiB writes (more than MAX_IN_FLIGHT), each with a distinct pattern.
    let n = 512u64;
    let bytes = {
        let mut out = vec![];
        for c in 0..n {
            let payload = vec![(c % 255) as u8 + 1; 4096];
            let r = Request {
                flags: 0,
                kind: mars_nbd::Command::Write,
                cookie: c,
                offset: c * 4096 % (4 * SIZE as u64),
                length: 4096,
            };
            out.extend_from_slice(&encode_request(&r));
            out.extend_from_slice(&payload);
        }
        out
    };
    let (mut rd, mut wr) = tokio::io::split(s);
    let send = tokio::spawn(async move {
        wr.write_all(&bytes).await.unwrap();
        wr
    });
    let mut seen = vec![false; n as usize];
    for _ in 0..n {
        let mut hdr = [0u8; 16];
        tokio::time::timeout(T, tokio::io::AsyncReadExt::read_exact(&mut rd, &mut hdr))
            .await
            .unwrap()
            .unwrap();
        let (err, c) = parse_simple_reply(&hdr).unwrap();
        assert_eq!(err, 0);
        assert!(!seen[c as usize]);
        seen[c as usize] = true;
    }
    let wr = send.await.unwrap();
    let data = e.snapshot();
    for c in 0..n {
        let off = (c * 4096 % (4 * SIZE as u64)) as usize;
        assert!(data[off..off + 4096]
            .iter()
            .all(|&b| b == (c % 255) as u8 + 1));
    }
    let s = rd.unsplit(wr);
    disconnect(s, h).await;
}

#[tokio::test]
async fn serve_over_tcp() {
    let (reg, _) = MemRegistry::with("d", MemExport::patterned(SIZE));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(mars_nbd::serve(listener, reg));
    // Two concurrent connections.
    for _ in 0..2 {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::AsyncReadExt;
        let mut g = [0u8; 18];
        c.read_exact(&mut g).await.unwrap();
        c.write_all(&(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).to_be_bytes())
            .await
            .unwrap();
        c.write_all(&encode_option_header(NBD_OPT_EXPORT_NAME, 1))
            .await
            .unwrap();
        c.write_all(b"d").await.unwrap();
        let mut r = [0u8; 10];
        c.read_exact(&mut r).await.unwrap();
        assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), SIZE as u64);
        let req = Request {
            flags: 0,
            kind: mars_nbd::Command::Read,
            cookie: 5,
            offset: 251,
            length: 3,
        };
        c.write_all(&encode_request(&req)).await.unwrap();
        let mut rep = [0u8; 19];
        c.read_exact(&mut rep).await.unwrap();
        assert_eq!(parse_simple_reply(&rep).unwrap(), (0, 5));
        assert_eq!(&rep[16..], &[0, 1, 2]);
    }
    server.abort();
}

/// Requests sent right behind NBD_OPT_GO (before its reply is read) must not be
/// lost when the TCP path re-splits the socket after the handshake.
#[tokio::test]
async fn requests_pipelined_behind_go_over_tcp() {
    use tokio::io::AsyncReadExt;
    let (reg, _) = MemRegistry::with("d", MemExport::patterned(SIZE));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(mars_nbd::serve(listener, reg));
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut g = [0u8; 18];
    c.read_exact(&mut g).await.unwrap();
    let mut msg = (NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    let go = encode_info_request(b"d", &[]);
    msg.extend_from_slice(&encode_option_header(NBD_OPT_GO, go.len() as u32));
    msg.extend_from_slice(&go);
    for cookie in 0..4u64 {
        msg.extend_from_slice(&encode_request(&Request {
            flags: 0,
            kind: mars_nbd::Command::Read,
            cookie,
            offset: cookie * 251 + 1,
            length: 2,
        }));
    }
    c.write_all(&msg).await.unwrap();
    loop {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        c.read_exact(&mut h).await.unwrap();
        let (_, typ, len) = parse_option_reply_header(&h).unwrap();
        let mut d = vec![0u8; len as usize];
        c.read_exact(&mut d).await.unwrap();
        if typ == NBD_REP_ACK {
            break;
        }
        assert_eq!(typ, NBD_REP_INFO);
    }
    let mut seen = vec![];
    for _ in 0..4 {
        let mut rep = [0u8; 18];
        tokio::time::timeout(T, c.read_exact(&mut rep))
            .await
            .unwrap()
            .unwrap();
        let (err, cookie) = parse_simple_reply(&rep).unwrap();
        assert_eq!(err, 0);
        assert_eq!(&rep[16..], &[1, 2]);
        seen.push(cookie);
    }
    seen.sort();
    assert_eq!(seen, vec![0, 1, 2, 3]);
    server.abort();
}
