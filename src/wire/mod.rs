//! Bytes on the wire: the fixed data-frame header, the length-prefixed
//! control messages of the join protocol, and the hello of the same-host
//! channel.
//!
//! Pure encode/decode with no I/O, so it can be fuzzed and unit tested
//! exhaustively. Every decoder checks lengths before it allocates and returns
//! an error (never panics) on truncated or malformed input.

pub mod coll;
pub mod control;
pub mod frame;
pub mod hello;
pub mod stripe;

pub use coll::{CollDesc, CollKind, ABORT_FAILED, ABORT_MISMATCH};
pub use frame::{FrameKind, Header, WireError, HEADER_LEN};
