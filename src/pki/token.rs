//! The job token: a 256-bit secret shared by the seed and the ranks of a
//! job, and the MAC it keys. How a side proves it holds the token over a
//! TLS session is the join protocol's (`bootstrap`).

use crate::{Error, Result};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use std::fmt;

/// A job's shared secret.
#[derive(Clone, PartialEq, Eq)]
pub struct JobToken([u8; 32]);

impl fmt::Debug for JobToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JobToken(<redacted>)")
    }
}

impl JobToken {
    /// A fresh random token.
    pub fn generate() -> Result<JobToken> {
        let mut b = [0u8; 32];
        SystemRandom::new()
            .fill(&mut b)
            .map_err(|_| Error::auth("the system random generator failed"))?;
        Ok(JobToken(b))
    }

    /// Parse 64 hex digits.
    pub fn from_hex(s: &str) -> Result<JobToken> {
        let s = s.trim();
        let bad = || {
            Error::config(
                "job token must be 64 hex digits (256 bits); take it from the launcher \
                 (RANKMESH_TOKEN) instead of making one up",
            )
        };
        if s.len() != 64 {
            return Err(bad());
        }
        let mut b = [0u8; 32];
        for (i, out) in b.iter_mut().enumerate() {
            *out = u8::from_str_radix(s.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        Ok(JobToken(b))
    }

    /// 64 lowercase hex digits (for handing to ranks; treat as a secret).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// HMAC-SHA256 of `msg` under the token.
    pub(crate) fn mac(&self, msg: &[u8]) -> [u8; 32] {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.0);
        let tag = hmac::sign(&key, msg);
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Whether `tag` is the MAC of `msg` under the token (in constant time).
    pub(crate) fn verify_mac(&self, msg: &[u8], tag: &[u8; 32]) -> bool {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.0);
        hmac::verify(&key, msg, tag).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_bad_tokens_refused() {
        let t = JobToken::generate().unwrap();
        assert_eq!(JobToken::from_hex(&t.to_hex()).unwrap(), t);
        assert!(JobToken::from_hex("abc").is_err());
        assert!(JobToken::from_hex(&"g".repeat(64)).is_err());
        assert!(JobToken::from_hex(&"é".repeat(32)).is_err());
        assert!(!format!("{t:?}").contains(&t.to_hex()));
    }
}
