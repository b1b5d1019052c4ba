//! What a peer port reads from a connection before it is authenticated:
//! one frame of at most `PREAUTH_MAX_FRAME` bytes (decoded as a message),
//! and in it an invitation token. Never a panic, never an allocation beyond
//! the limit, never a token that does not print back as it was read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mars_proto::token::Token;
use mars_proto::{read_msg_max, Msg};

/// The limit of crates/mars/src/tls.rs (`PREAUTH_MAX_FRAME`).
const PREAUTH_MAX_FRAME: u32 = 4096;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut r = data;
    if let Ok(m) = rt.block_on(read_msg_max(&mut r, PREAUTH_MAX_FRAME)) {
        assert!(data.len() >= mars_proto::FRAME_HEADER_LEN);
        let (len, _) = mars_proto::parse_frame_header(data).expect("a frame was read");
        assert!(len <= PREAUTH_MAX_FRAME);
        let token = match &m {
            Msg::Join {
                token_id, secret, ..
            }
            | Msg::MergeToken {
                token_id, secret, ..
            } => Some(format!("mars1.{token_id}.{secret}.{}", "0".repeat(64))),
            _ => None,
        };
        if let Some(t) = token {
            if let Ok(p) = Token::parse(&t) {
                assert_eq!(Token::parse(&p.text()), Ok(p));
            }
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(t) = Token::parse(text) {
            assert_eq!(Token::parse(&t.text()), Ok(t));
        }
    }
});
