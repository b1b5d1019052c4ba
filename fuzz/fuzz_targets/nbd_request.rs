//! The pure NBD wire parsers on arbitrary bytes, with encode round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mars_nbd::proto::*;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = parse_request(data) {
        assert_eq!(
            &encode_request(&r)[..],
            &data[..REQUEST_LEN],
            "request round-trip"
        );
        assert_eq!(Command::from_u16(r.kind.to_u16()), r.kind);
    }

    if let Ok((opt, len)) = parse_option_header(data) {
        assert_eq!(
            &encode_option_header(opt, len)[..],
            &data[..OPTION_HEADER_LEN]
        );
    }

    if let Ok(req) = parse_info_request(data) {
        assert!(req.name.len() <= MAX_STRING_LEN);
        assert!(!req.name.contains('\0'));
        // The lengths account for the payload exactly, so re-encoding gives it back.
        assert_eq!(
            encode_info_request(req.name.as_bytes(), &req.requests),
            data
        );
    }

    if let Ok((error, cookie)) = parse_simple_reply(data) {
        assert_eq!(
            &encode_simple_reply(error, cookie)[..],
            &data[..SIMPLE_REPLY_LEN]
        );
    }

    if let Ok((opt, typ, len)) = parse_option_reply_header(data) {
        let mut out = Vec::new();
        put_option_reply(&mut out, opt, typ, &[]);
        assert_eq!(&out[..16], &data[..16]);
        assert_eq!(
            u32::from_be_bytes([data[16], data[17], data[18], data[19]]),
            len
        );
    }
});
