mod common;

use common::*;
use mars_nbd::proto::*;
use mars_nbd::NbdError;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FIXED: u32 = NBD_FLAG_C_FIXED_NEWSTYLE;

fn two_exports() -> Arc<MemRegistry> {
    Arc::new(MemRegistry {
        exports: vec![
            ("alpha".into(), Arc::new(MemExport::new(1 << 20))),
            ("beta-2".into(), Arc::new(MemExport::new(4096))),
        ],
    })
}

#[tokio::test]
async fn greeting_flags() {
    let (mut s, h) = start(two_exports());
    let f = hello(&mut s, FIXED).await;
    assert_eq!(f, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    send_option(&mut s, NBD_OPT_ABORT, &[]).await;
    assert_eq!(
        read_opt_reply(&mut s).await,
        (NBD_OPT_ABORT, NBD_REP_ACK, vec![])
    );
    expect_eof(&mut s).await;
    finish(h).await.unwrap();
}

#[tokio::test]
async fn opt_list_lists_names() {
    let (mut s, h) = start(two_exports());
    hello(&mut s, FIXED).await;
    send_option(&mut s, NBD_OPT_LIST, &[]).await;
    let mut names = vec![];
    loop {
        let (opt, typ, d) = read_opt_reply(&mut s).await;
        assert_eq!(opt, NBD_OPT_LIST);
        match typ {
            NBD_REP_SERVER => {
                let n = u32::from_be_bytes(d[0..4].try_into().unwrap()) as usize;
                names.push(String::from_utf8(d[4..4 + n].to_vec()).unwrap());
            }
            NBD_REP_ACK => break,
            t => panic!("unexpected {t:#x}"),
        }
    }
    assert_eq!(names, vec!["alpha", "beta-2"]);

    // LIST with data is invalid, and the session continues.
    send_option(&mut s, NBD_OPT_LIST, b"x").await;
    assert_eq!(read_opt_reply(&mut s).await.1, NBD_REP_ERR_INVALID);
    send_option(&mut s, NBD_OPT_ABORT, &[]).await;
    assert_eq!(read_opt_reply(&mut s).await.1, NBD_REP_ACK);
    finish(h).await.unwrap();
}

async fn info_replies(s: &mut tokio::io::DuplexStream, opt: u32) -> (u32, Vec<Vec<u8>>) {
    let mut infos = vec![];
    loop {
        let (o, typ, d) = read_opt_reply(s).await;
        assert_eq!(o, opt);
        if typ == NBD_REP_INFO {
            infos.push(d);
        } else {
            return (typ, infos);
        }
    }
}

fn find_info(infos: &[Vec<u8>], t: u16) -> Option<&[u8]> {
    infos
        .iter()
        .find(|d| u16::from_be_bytes([d[0], d[1]]) == t)
        .map(|d| &d[2..])
}

#[tokio::test]
async fn opt_info_then_go() {
    let (mut s, h) = start(two_exports());
    hello(&mut s, FIXED).await;
    let payload = encode_info_request(b"alpha", &[NBD_INFO_NAME, NBD_INFO_BLOCK_SIZE, 999]);
    send_option(&mut s, NBD_OPT_INFO, &payload).await;
    let (end, infos) = info_replies(&mut s, NBD_OPT_INFO).await;
    assert_eq!(end, NBD_REP_ACK);
    let exp = find_info(&infos, NBD_INFO_EXPORT).expect("NBD_INFO_EXPORT");
    assert_eq!(exp.len(), 10);
    assert_eq!(u64::from_be_bytes(exp[0..8].try_into().unwrap()), 1 << 20);
    let flags = u16::from_be_bytes([exp[8], exp[9]]);
    let want = NBD_FLAG_HAS_FLAGS
        | NBD_FLAG_SEND_FLUSH
        | NBD_FLAG_SEND_FUA
        | NBD_FLAG_SEND_TRIM
        | NBD_FLAG_SEND_WRITE_ZEROES
        | NBD_FLAG_CAN_MULTI_CONN;
    assert_eq!(flags, want);
    let bs = find_info(&infos, NBD_INFO_BLOCK_SIZE).expect("NBD_INFO_BLOCK_SIZE");
    assert_eq!(bs.len(), 12);
    assert_eq!(u32::from_be_bytes(bs[0..4].try_into().unwrap()), 1);
    assert_eq!(u32::from_be_bytes(bs[4..8].try_into().unwrap()), 4096);
    assert_eq!(u32::from_be_bytes(bs[8..12].try_into().unwrap()), 32 << 20);
    assert_eq!(find_info(&infos, NBD_INFO_NAME), Some(&b"alpha"[..]));

    // GO with the same parameters: same info, then transmission.
    send_option(&mut s, NBD_OPT_GO, &payload).await;
    let (end, infos2) = info_replies(&mut s, NBD_OPT_GO).await;
    assert_eq!(end, NBD_REP_ACK);
    assert_eq!(infos, infos2);
    assert_eq!(read(&mut s, 0, 512).await.unwrap(), vec![0u8; 512]);
    disconnect(s, h).await;
}

#[tokio::test]
async fn unknown_export_is_err_unknown() {
    let (mut s, h) = start(two_exports());
    hello(&mut s, FIXED).await;
    for opt in [NBD_OPT_INFO, NBD_OPT_GO] {
        send_option(&mut s, opt, &encode_info_request(b"nope", &[])).await;
        let (end, infos) = info_replies(&mut s, opt).await;
        assert_eq!(end, NBD_REP_ERR_UNKNOWN);
        assert!(infos.is_empty());
    }
    // The empty name is not a wildcard.
    send_option(&mut s, NBD_OPT_GO, &encode_info_request(b"", &[])).await;
    assert_eq!(
        info_replies(&mut s, NBD_OPT_GO).await.0,
        NBD_REP_ERR_UNKNOWN
    );
    // The session continues: a valid GO still works.
    send_option(&mut s, NBD_OPT_GO, &encode_info_request(b"beta-2", &[])).await;
    assert_eq!(info_replies(&mut s, NBD_OPT_GO).await.0, NBD_REP_ACK);
    disconnect(s, h).await;
}

#[tokio::test]
async fn unsupported_options_err_unsup() {
    let (mut s, h) = start(two_exports());
    hello(&mut s, FIXED).await;
    for opt in [
        NBD_OPT_STRUCTURED_REPLY,
        NBD_OPT_EXTENDED_HEADERS,
        NBD_OPT_LIST_META_CONTEXT,
        NBD_OPT_SET_META_CONTEXT,
        NBD_OPT_PEEK_EXPORT,
        12345,
    ] {
        for payload in [&b""[..], b"some payload"] {
            send_option(&mut s, opt, payload).await;
            let (o, typ, _) = read_opt_reply(&mut s).await;
            assert_eq!((o, typ), (opt, NBD_REP_ERR_UNSUP));
        }
    }
    send_option(&mut s, NBD_OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(
        read_opt_reply(&mut s).await.1,
        NBD_REP_ERR_UNSUP,
        "structured replies must be refused"
    );
    // Without TLS configured, STARTTLS is refused by policy (NOTLS mode), and
    // the session goes on in plaintext.
    for payload in [&b""[..], b"x"] {
        send_option(&mut s, NBD_OPT_STARTTLS, payload).await;
        assert_eq!(read_opt_reply(&mut s).await.1, NBD_REP_ERR_POLICY);
    }
    send_option(&mut s, NBD_OPT_LIST, &[]).await;
    assert_eq!(read_opt_reply(&mut s).await.1, NBD_REP_SERVER);
    assert_eq!(read_opt_reply(&mut s).await.1, NBD_REP_SERVER);
    assert_eq!(read_opt_reply(&mut s).await.1, NBD_REP_ACK);
    send_option(&mut s, NBD_OPT_ABORT, &[]).await;
    assert_eq!(read_opt_reply(&mut s).await.1, NBD_REP_ACK);
    expect_eof(&mut s).await;
    finish(h).await.unwrap();
}

#[tokio::test]
async fn opt_abort_with_payload_acks_and_closes() {
    let (mut s, h) = start(two_exports());
    hello(&mut s, FIXED).await;
    send_option(&mut s, NBD_OPT_ABORT, b"ignored").await;
    assert_eq!(
        read_opt_reply(&mut s).await,
        (NBD_OPT_ABORT, NBD_REP_ACK, vec![])
    );
    expect_eof(&mut s).await;
    finish(h).await.unwrap();
}

#[tokio::test]
async fn malformed_go_payloads_err_invalid() {
    let (mut s, h) = start(two_exports());
    hello(&mut s, FIXED).await;
    let mut bad: Vec<Vec<u8>> = vec![
        vec![],                                  // empty
        vec![0, 0, 0],                           // short
        vec![0, 0, 0, 5, b'a', b'l', 0, 0],      // name longer than payload
        vec![0xff, 0xff, 0xff, 0xff, 0, 0],      // huge name length
        vec![0, 0, 0, 0, 0, 2, 0, 1],            // count 2, one item
        vec![0, 0, 0, 0, 0, 0, 9],               // trailing garbage
        encode_info_request(&[0xff, 0xfe], &[]), // not UTF-8
    ];
    let mut long = encode_info_request(&[b'a'; 5000], &[]);
    bad.push(std::mem::take(&mut long)); // name > 4096 bytes
    for opt in [NBD_OPT_INFO, NBD_OPT_GO] {
        for p in &bad {
            send_option(&mut s, opt, p).await;
            let (o, typ, _) = read_opt_reply(&mut s).await;
            assert_eq!((o, typ), (opt, NBD_REP_ERR_INVALID), "payload {p:?}");
        }
    }
    // Still alive.
    send_option(&mut s, NBD_OPT_GO, &encode_info_request(b"alpha", &[])).await;
    assert_eq!(info_replies(&mut s, NBD_OPT_GO).await.0, NBD_REP_ACK);
    disconnect(s, h).await;
}

#[tokio::test]
async fn client_without_fixed_newstyle_is_closed() {
    for flags in [0u32, NBD_FLAG_C_NO_ZEROES, FIXED | 0x4, 0xffff_ffff] {
        let (mut s, h) = start(two_exports());
        hello(&mut s, flags).await;
        expect_eof(&mut s).await;
        assert!(matches!(finish(h).await, Err(NbdError::ClientFlags(f)) if f == flags));
    }
}

#[tokio::test]
async fn export_name_with_and_without_zeroes() {
    for (cflags, reply_len) in [(FIXED, 10 + 124), (FIXED | NBD_FLAG_C_NO_ZEROES, 10)] {
        let (mut s, h) = start(two_exports());
        hello(&mut s, cflags).await;
        send_option(&mut s, NBD_OPT_EXPORT_NAME, b"beta-2").await;
        let d = read_data(&mut s, reply_len).await;
        assert_eq!(u64::from_be_bytes(d[0..8].try_into().unwrap()), 4096);
        assert_ne!(u16::from_be_bytes([d[8], d[9]]) & NBD_FLAG_HAS_FLAGS, 0);
        assert!(d[10..].iter().all(|&b| b == 0));
        // Transmission directly follows.
        assert_eq!(write(&mut s, 0, 0, b"hello").await, 0);
        assert_eq!(read(&mut s, 0, 5).await.unwrap(), b"hello");
        disconnect(s, h).await;
    }
}

#[tokio::test]
async fn export_name_unknown_closes() {
    let (mut s, h) = start(two_exports());
    hello(&mut s, FIXED | NBD_FLAG_C_NO_ZEROES).await;
    send_option(&mut s, NBD_OPT_EXPORT_NAME, b"missing").await;
    expect_eof(&mut s).await;
    assert!(matches!(finish(h).await, Err(NbdError::UnknownExport(n)) if n == "missing"));
}

#[tokio::test]
async fn oversized_option_is_refused_and_closed() {
    let (mut s, h) = start(two_exports());
    hello(&mut s, FIXED).await;
    // Only the header: the server must not wait for the 1 GiB payload.
    s.write_all(&encode_option_header(NBD_OPT_GO, 1 << 30))
        .await
        .unwrap();
    let (o, typ, _) = read_opt_reply(&mut s).await;
    assert_eq!((o, typ), (NBD_OPT_GO, NBD_REP_ERR_TOO_BIG));
    expect_eof(&mut s).await;
    assert!(matches!(
        finish(h).await,
        Err(NbdError::OptionTooLarge { .. })
    ));
}

#[tokio::test]
async fn bad_option_magic_closes() {
    let (mut s, h) = start(two_exports());
    hello(&mut s, FIXED).await;
    let mut hdr = encode_option_header(NBD_OPT_LIST, 0);
    hdr[0] = b'X';
    s.write_all(&hdr).await.unwrap();
    expect_eof(&mut s).await;
    assert!(matches!(
        finish(h).await,
        Err(NbdError::Proto(ProtoError::BadMagic(_)))
    ));
}

#[tokio::test]
async fn client_hangup_mid_handshake_does_not_hang() {
    let (mut s, h) = start(two_exports());
    hello(&mut s, FIXED).await;
    s.write_all(&encode_option_header(NBD_OPT_GO, 100))
        .await
        .unwrap();
    s.write_all(&[0u8; 10]).await.unwrap();
    drop(s);
    // Either Ok or an EOF error, but it must finish.
    let _ = finish(h).await;

    let (mut s, h) = start(two_exports());
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.unwrap();
    drop(s);
    let _ = finish(h).await;
}

#[tokio::test]
async fn read_only_export_is_advertised() {
    let e = MemExport::new(8192);
    e.read_only.store(true, Ordering::SeqCst);
    let (reg, _) = MemRegistry::with("ro", e);
    let (s, h, size, flags) = connect_go(reg, "ro").await;
    assert_eq!(size, 8192);
    assert_ne!(flags & NBD_FLAG_READ_ONLY, 0);
    assert_eq!(
        flags
            & (NBD_FLAG_ROTATIONAL
                | NBD_FLAG_SEND_DF
                | NBD_FLAG_SEND_CACHE
                | NBD_FLAG_SEND_FAST_ZERO),
        0
    );
    disconnect(s, h).await;
}
