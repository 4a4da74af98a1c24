//! Striped messages: a large payload split into parts that travel on
//! several connections at once (one per transport thread), so that more
//! than one core encrypts and decrypts it.
//!
//! The message's [`Header`](super::Header) names the number of parts and
//! the sender's number of the message (`stripes`, `stripe`) and carries
//! part 0 on the first connection. Every other part travels on a stream of
//! its own behind this 16-byte little-endian header:
//!
//! | offset | size | field   | meaning                                 |
//! |-------:|-----:|---------|-----------------------------------------|
//! | 0      | 2    | magic   | `b"RS"`                                 |
//! | 2      | 1    | version | [`STRIPE_VERSION`]                      |
//! | 3      | 1    | part    | which part, 1 or more                   |
//! | 4      | 4    | stripe  | the message's stripe number             |
//! | 8      | 8    | len     | payload bytes of this part that follow  |
//!
//! Part `k` of a payload of `len` bytes in `n` parts is the byte range
//! [`part_range`]`(len, n, k)`: equal parts of `len.div_ceil(n)` bytes, the
//! last one shorter.

use super::WireError;

/// Size of an encoded [`StripeHeader`].
pub const STRIPE_HEADER_LEN: usize = 16;
/// Stripe header format version this build speaks.
pub const STRIPE_VERSION: u8 = 1;
const MAGIC: [u8; 2] = *b"RS";

/// The header of one part (not the first) of a striped message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StripeHeader {
    /// Which part (1 or more; part 0 travels with the message header).
    pub part: u8,
    /// The message's stripe number ([`super::Header::stripe`]).
    pub stripe: u32,
    /// Payload bytes of this part.
    pub len: u64,
}

impl StripeHeader {
    /// Encode.
    pub fn encode(&self) -> [u8; STRIPE_HEADER_LEN] {
        let mut b = [0u8; STRIPE_HEADER_LEN];
        b[0..2].copy_from_slice(&MAGIC);
        b[2] = STRIPE_VERSION;
        b[3] = self.part;
        b[4..8].copy_from_slice(&self.stripe.to_le_bytes());
        b[8..16].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Decode and validate.
    pub fn decode(buf: &[u8]) -> Result<StripeHeader, WireError> {
        if buf.len() < STRIPE_HEADER_LEN {
            return Err(WireError::Truncated {
                need: STRIPE_HEADER_LEN,
                got: buf.len(),
            });
        }
        if buf[0..2] != MAGIC {
            return Err(WireError::BadMagic);
        }
        if buf[2] != STRIPE_VERSION {
            return Err(WireError::Version {
                ours: STRIPE_VERSION,
                theirs: buf[2],
            });
        }
        if buf[3] == 0 {
            // Part 0 travels behind the message header, never alone.
            return Err(WireError::Reserved);
        }
        let mut stripe = [0u8; 4];
        stripe.copy_from_slice(&buf[4..8]);
        let mut len = [0u8; 8];
        len.copy_from_slice(&buf[8..16]);
        Ok(StripeHeader {
            part: buf[3],
            stripe: u32::from_le_bytes(stripe),
            len: u64::from_le_bytes(len),
        })
    }
}

/// The bytes of part `k` of a `len`-byte payload in `parts` parts, or
/// `None` when there is no such part (`k >= parts`, or a split that leaves
/// a part empty: every part has at least one byte).
pub fn part_range(len: u64, parts: u8, k: u8) -> Option<std::ops::Range<u64>> {
    if parts < 2 || k >= parts {
        return None;
    }
    let size = len.div_ceil(u64::from(parts));
    let start = size.checked_mul(u64::from(k))?;
    if (u64::from(parts) - 1) * size >= len {
        return None;
    }
    Some(start..(start + size).min(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_bad_ones_are_errors() {
        let h = StripeHeader {
            part: 3,
            stripe: 0xfeed_beef,
            len: 1 << 33,
        };
        let enc = h.encode();
        assert_eq!(StripeHeader::decode(&enc), Ok(h));
        for n in 0..STRIPE_HEADER_LEN {
            assert!(StripeHeader::decode(&enc[..n]).is_err());
        }
        let mut b = enc;
        b[1] = b'M';
        assert_eq!(StripeHeader::decode(&b), Err(WireError::BadMagic));
        let mut b = enc;
        b[2] = 7;
        assert!(matches!(
            StripeHeader::decode(&b),
            Err(WireError::Version { theirs: 7, .. })
        ));
        let mut b = enc;
        b[3] = 0;
        assert_eq!(StripeHeader::decode(&b), Err(WireError::Reserved));
    }

    #[test]
    fn parts_cover_the_payload_exactly_once() {
        for len in [2u64, 3, 7, 100, 4096, 1 << 20, (1 << 20) + 3] {
            for parts in 2..=8u8 {
                let ranges: Vec<_> = (0..parts).map(|k| part_range(len, parts, k)).collect();
                if ranges.iter().any(|r| r.is_none()) {
                    // Only splits that would leave a part empty are refused.
                    assert!((u64::from(parts) - 1) * len.div_ceil(u64::from(parts)) >= len);
                    continue;
                }
                let mut at = 0;
                for r in ranges.into_iter().flatten() {
                    assert_eq!(r.start, at);
                    assert!(r.end > r.start);
                    at = r.end;
                }
                assert_eq!(at, len, "len {len} parts {parts}");
            }
        }
        assert_eq!(part_range(100, 1, 0), None);
        assert_eq!(part_range(100, 4, 4), None);
        assert_eq!(part_range(5, 4, 0), None);
    }
}
