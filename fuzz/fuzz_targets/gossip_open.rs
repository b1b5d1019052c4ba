//! A gossip datagram from anyone: `Keyring::open` answers without a panic;
//! what opens was sealed with a key of the ring, and sealing it again opens
//! to the same payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mars_proto::gossip::{key_id, Keyring};

fuzz_target!(|data: &[u8]| {
    let keys = [[1u8; 32], [2u8; 32]];
    let ring = Keyring::new(keys.to_vec(), Some(key_id(&keys[0])));
    let version = mars_proto::PROTOCOL_VERSION;
    if let Ok(p) = ring.open(version, data) {
        // Only a forger holding a key gets here (the fuzzer will not): the
        // header named a key of the ring.
        let again = ring.seal(version, &p).expect("a primary key");
        assert_eq!(ring.open(version, &again).expect("opens"), p);
    }
    // A sealed payload of the fuzzer's bytes always opens to them.
    let sealed = ring.seal(version, data).expect("a primary key");
    assert_eq!(ring.open(version, &sealed).expect("opens"), data);
});
