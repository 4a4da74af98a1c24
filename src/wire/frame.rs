//! The data-frame header.
//!
//! Every message between ranks travels on its own QUIC stream as one fixed
//! 64-byte little-endian header followed by `len` raw payload bytes:
//!
//! | offset | size | field   | meaning                                              |
//! |-------:|-----:|---------|------------------------------------------------------|
//! | 0      | 2    | magic   | `b"RM"`                                              |
//! | 2      | 1    | version | frame format version ([`FRAME_VERSION`])             |
//! | 3      | 1    | kind    | [`FrameKind`]: 1 p2p 2 coll 3 bye 4 abort 5 skip    |
//! | 4      | 1    | dtype   | element type tag ([`DType`])                         |
//! | 5      | 1    | op      | reduce op tag, 0 when none                           |
//! | 6      | 1    | coll    | collective kind tag, 0 for point-to-point            |
//! | 7      | 1    | stripes | parts the payload is striped into, 0 when it is not  |
//! | 8      | 4    | src     | sender's world rank                                  |
//! | 12     | 4    | epoch   | membership epoch of the communicator                 |
//! | 16     | 8    | comm_id | communicator id                                      |
//! | 24     | 8    | seq     | collective sequence number, or the p2p tag           |
//! | 32     | 8    | sub     | step/chunk within a collective, or p2p message number|
//! | 40     | 8    | len     | payload bytes that follow                            |
//! | 48     | 8    | total   | element count of the whole collective buffer         |
//! | 56     | 4    | root    | collective root, `u32::MAX` when none                |
//! | 60     | 4    | stripe  | the sender's number of a striped message, else 0     |
//!
//! A striped message (see `wire::stripe`) carries its first part after the
//! header; the other parts travel on streams of their own, each behind a
//! [`crate::wire::stripe::StripeHeader`] naming `stripe`.

use crate::datatype::DType;
use std::fmt;

/// Size of the encoded header in bytes.
pub const HEADER_LEN: usize = 64;
/// Frame format version this build speaks.
pub const FRAME_VERSION: u8 = 2;
const MAGIC: [u8; 2] = *b"RM";

crate::tags::u8_enum! {
/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// A point-to-point message (`send`/`recv`).
    P2p = 1,
    /// One step (or chunk) of a collective.
    Coll = 2,
    /// The sender is finalizing: it will send nothing more on this connection.
    Bye = 3,
    /// The sender aborted the collective `seq` of `comm_id`/`epoch` (the
    /// ranks disagree on the call); the payload is its explanation (UTF-8).
    Abort = 4,
    /// The sender cancelled point-to-point message number `sub` of tag
    /// `seq`: the receiver skips that number. No payload.
    Skip = 5,
}
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// What the frame carries.
    pub kind: FrameKind,
    /// Element type of the payload.
    pub dtype: DType,
    /// Reduce-op tag (0 = none).
    pub op: u8,
    /// Collective kind tag (0 = point-to-point).
    pub coll: u8,
    /// Sender's world rank.
    pub src: u32,
    /// Membership epoch.
    pub epoch: u32,
    /// Communicator id.
    pub comm_id: u64,
    /// Collective sequence number or p2p tag.
    pub seq: u64,
    /// Step/chunk or p2p message number.
    pub sub: u64,
    /// Payload length in bytes.
    pub len: u64,
    /// Element count of the whole collective buffer (mismatch detection).
    pub total: u64,
    /// Collective root (`u32::MAX` = none).
    pub root: u32,
    /// Parts the payload is striped into across connections (0: not
    /// striped; never 1).
    pub stripes: u8,
    /// The sender's number of this striped message (0 when not striped).
    pub stripe: u32,
}

impl Header {
    /// A header with every optional field empty.
    pub fn new(kind: FrameKind, src: u32, comm_id: u64, epoch: u32) -> Header {
        Header {
            kind,
            dtype: DType::Bytes,
            op: 0,
            coll: 0,
            src,
            epoch,
            comm_id,
            seq: 0,
            sub: 0,
            len: 0,
            total: 0,
            root: u32::MAX,
            stripes: 0,
            stripe: 0,
        }
    }

    /// Encode into the fixed 64-byte layout.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..2].copy_from_slice(&MAGIC);
        b[2] = FRAME_VERSION;
        b[3] = self.kind as u8;
        b[4] = self.dtype as u8;
        b[5] = self.op;
        b[6] = self.coll;
        b[8..12].copy_from_slice(&self.src.to_le_bytes());
        b[12..16].copy_from_slice(&self.epoch.to_le_bytes());
        b[16..24].copy_from_slice(&self.comm_id.to_le_bytes());
        b[24..32].copy_from_slice(&self.seq.to_le_bytes());
        b[32..40].copy_from_slice(&self.sub.to_le_bytes());
        b[40..48].copy_from_slice(&self.len.to_le_bytes());
        b[48..56].copy_from_slice(&self.total.to_le_bytes());
        b[56..60].copy_from_slice(&self.root.to_le_bytes());
        b[7] = self.stripes;
        b[60..64].copy_from_slice(&self.stripe.to_le_bytes());
        b
    }

    /// Decode and validate a header. `buf` may be longer than the header;
    /// only the first [`HEADER_LEN`] bytes are read.
    pub fn decode(buf: &[u8]) -> Result<Header, WireError> {
        if buf.len() < HEADER_LEN {
            return Err(WireError::Truncated {
                need: HEADER_LEN,
                got: buf.len(),
            });
        }
        if buf[0..2] != MAGIC {
            return Err(WireError::BadMagic);
        }
        if buf[2] != FRAME_VERSION {
            return Err(WireError::Version {
                ours: FRAME_VERSION,
                theirs: buf[2],
            });
        }
        let kind = FrameKind::try_from(buf[3]).map_err(WireError::Kind)?;
        let dtype = DType::try_from(buf[4]).map_err(WireError::DType)?;
        // A message is striped into two parts or more, and only a striped
        // message has a stripe number.
        if buf[7] == 1 || (buf[7] == 0 && buf[60..64] != [0; 4]) {
            return Err(WireError::Reserved);
        }
        let u32_at = |o: usize| u32::from_le_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&buf[o..o + 8]);
            u64::from_le_bytes(a)
        };
        Ok(Header {
            kind,
            dtype,
            op: buf[5],
            coll: buf[6],
            src: u32_at(8),
            epoch: u32_at(12),
            comm_id: u64_at(16),
            seq: u64_at(24),
            sub: u64_at(32),
            len: u64_at(40),
            total: u64_at(48),
            root: u32_at(56),
            stripes: buf[7],
            stripe: u32_at(60),
        })
    }
}

/// Why a header could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WireError {
    /// Fewer bytes than a header needs.
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        got: usize,
    },
    /// The frame does not start with the rankmesh magic.
    BadMagic,
    /// The peer speaks another frame version.
    Version {
        /// Our version.
        ours: u8,
        /// Theirs.
        theirs: u8,
    },
    /// Unknown frame kind.
    Kind(u8),
    /// Unknown element type tag.
    DType(u8),
    /// A reserved field is not zero.
    Reserved,
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Truncated { need, got } => {
                write!(f, "truncated frame header: {got} of {need} bytes")
            }
            WireError::BadMagic => write!(f, "not a rankmesh frame (bad magic)"),
            WireError::Version { ours, theirs } => write!(
                f,
                "frame version mismatch: this build speaks v{ours}, the peer v{theirs}; \
                 run the same rankmesh version on every rank"
            ),
            WireError::Kind(k) => write!(f, "unknown frame kind {k}"),
            WireError::DType(d) => write!(f, "unknown element type tag {d}"),
            WireError::Reserved => write!(
                f,
                "inconsistent striping fields (one part, or a stripe number without parts)"
            ),
        }
    }
}

impl std::error::Error for WireError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            kind: FrameKind::Coll,
            dtype: DType::BF16,
            op: 3,
            coll: 7,
            src: 0xdead_beef,
            epoch: 9,
            comm_id: u64::MAX - 1,
            seq: 41,
            sub: (2 << 32) | 5,
            len: 1 << 40,
            total: 12345,
            root: 2,
            stripes: 4,
            stripe: 77,
        }
    }

    #[test]
    fn round_trip_every_kind_and_dtype() {
        for kind in [FrameKind::P2p, FrameKind::Coll, FrameKind::Bye] {
            for d in 0..=10u8 {
                let mut h = sample();
                h.kind = kind;
                h.dtype = DType::try_from(d).unwrap();
                let enc = h.encode();
                assert_eq!(Header::decode(&enc).unwrap(), h);
            }
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        let enc = sample().encode();
        for n in 0..HEADER_LEN {
            assert_eq!(
                Header::decode(&enc[..n]),
                Err(WireError::Truncated {
                    need: HEADER_LEN,
                    got: n
                })
            );
        }
    }

    #[test]
    fn corrupt_fields_are_errors() {
        let enc = sample().encode();
        let mut b = enc;
        b[0] = b'X';
        assert_eq!(Header::decode(&b), Err(WireError::BadMagic));
        let mut b = enc;
        b[2] = 9;
        let e = Header::decode(&b).unwrap_err();
        assert_eq!(e, WireError::Version { ours: 2, theirs: 9 });
        assert!(e.to_string().contains("v2") && e.to_string().contains("v9"));
        let mut b = enc;
        b[3] = 0;
        assert_eq!(Header::decode(&b), Err(WireError::Kind(0)));
        let mut b = enc;
        b[4] = 77;
        assert_eq!(Header::decode(&b), Err(WireError::DType(77)));
        // One part is no striping; a stripe number needs parts.
        let mut b = enc;
        b[7] = 1;
        assert_eq!(Header::decode(&b), Err(WireError::Reserved));
        let mut b = enc;
        b[7] = 0;
        assert_eq!(Header::decode(&b), Err(WireError::Reserved));
        b[60..64].fill(0);
        assert_eq!(Header::decode(&b).map(|h| h.stripes), Ok(0));
    }

    #[test]
    fn every_single_byte_corruption_decodes_or_errors_without_panic() {
        let enc = sample().encode();
        for i in 0..HEADER_LEN {
            for v in [0u8, 1, 0x7f, 0xff] {
                let mut b = enc;
                b[i] = v;
                let _ = Header::decode(&b);
            }
        }
    }
}
