#![no_main]
//! Any bytes given to the frame-header decoder: an error or a header that
//! encodes back to the same 64 bytes, never a panic.

use libfuzzer_sys::fuzz_target;
use rankmesh::internals::wire::{Header, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Header::decode(data) {
        assert_eq!(&h.encode()[..], &data[..HEADER_LEN]);
    }
});
