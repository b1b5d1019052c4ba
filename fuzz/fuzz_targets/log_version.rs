//! Version files (JSON read from disk) and logfile names (read from a directory).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mars_logfmt::{logfile_name, parse_logfile_name, Version};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(v) = Version::from_json(s) {
        assert!(v.is_consistent());
        assert!(v.digest().is_some());
        let again = Version::from_json(&v.to_json()).expect("to_json output does not parse");
        assert_eq!(again, v);
    }
    if let Some(n) = parse_logfile_name(s) {
        let name = logfile_name(n.seq, &n.node);
        assert_eq!(parse_logfile_name(&name), Some(n));
    }
});
