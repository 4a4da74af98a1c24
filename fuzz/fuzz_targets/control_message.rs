#![no_main]
//! Any bytes given to the control-message decoders (prefix, then each
//! message type of the join exchange): an error or a value, never a panic
//! or an allocation beyond the input.

use libfuzzer_sys::fuzz_target;
use rankmesh::internals::wire::control::{self, Formation, JoinReply, JoinRequest, Ready, PREFIX_LEN};

fuzz_target!(|data: &[u8]| {
    if data.len() >= PREFIX_LEN {
        let mut pre = [0u8; PREFIX_LEN];
        pre.copy_from_slice(&data[..PREFIX_LEN]);
        let _ = control::decode_prefix(&pre);
    }
    let _ = control::decode_body::<JoinRequest>(data);
    let _ = control::decode_body::<JoinReply>(data);
    let _ = control::decode_body::<Ready>(data);
    let _ = control::decode_body::<Formation>(data);
});
