#![no_main]
//! Any bytes given to the same-host channel's hello decoder: an error or a
//! hello that encodes back to the same 42 bytes, never a panic.

use libfuzzer_sys::fuzz_target;
use rankmesh::internals::wire::hello::{Hello, HELLO_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Hello::decode(data) {
        assert_eq!(&h.encode()[..], &data[..HELLO_LEN]);
    }
});
