//! The job token and the proofs of holding it.
//!
//! The token is a 256-bit secret shared by the seed and the ranks of a job.
//! It never crosses the wire: each side proves it holds the token with
//! HMAC-SHA256(token, exporter secret of this TLS session, direction), which
//! a man in the middle (holding a different session) cannot produce or replay.

use crate::{Error, Result};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use std::fmt;

const EXPORTER_LABEL: &[u8] = b"EXPORTER-rankmesh-join-v1";

/// Which side is proving.
#[derive(Clone, Copy, Debug)]
pub enum Direction {
    /// The rank proves to the seed.
    RankToSeed,
    /// The seed proves to the rank.
    SeedToRank,
}

impl Direction {
    fn context(self) -> &'static [u8] {
        match self {
            Direction::RankToSeed => b"rank->seed",
            Direction::SeedToRank => b"seed->rank",
        }
    }
}

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

    /// The proof for `direction` over a session's exporter secret.
    pub(crate) fn proof(&self, conn: &quinn::Connection, direction: Direction) -> Result<[u8; 32]> {
        let mut ekm = [0u8; 32];
        conn.export_keying_material(&mut ekm, EXPORTER_LABEL, direction.context())
            .map_err(|_| Error::auth("cannot export TLS keying material"))?;
        Ok(self.proof_over(&ekm))
    }

    fn proof_over(&self, ekm: &[u8; 32]) -> [u8; 32] {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.0);
        let tag = hmac::sign(&key, ekm);
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Check a proof in constant time.
    pub(crate) fn verify(
        &self,
        conn: &quinn::Connection,
        direction: Direction,
        proof: &[u8; 32],
    ) -> Result<bool> {
        let mut ekm = [0u8; 32];
        conn.export_keying_material(&mut ekm, EXPORTER_LABEL, direction.context())
            .map_err(|_| Error::auth("cannot export TLS keying material"))?;
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.0);
        Ok(hmac::verify(&key, &ekm, proof).is_ok())
    }
}

/// A random job id: 16 hex digits.
pub fn random_job_id() -> Result<String> {
    let mut b = [0u8; 8];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| Error::auth("the system random generator failed"))?;
    Ok(b.iter().map(|b| format!("{b:02x}")).collect())
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

    #[test]
    fn proofs_differ_by_token_and_session() {
        let a = JobToken::generate().unwrap();
        let b = JobToken::generate().unwrap();
        let e1 = [1u8; 32];
        let e2 = [2u8; 32];
        assert_ne!(a.proof_over(&e1), b.proof_over(&e1));
        assert_ne!(a.proof_over(&e1), a.proof_over(&e2));
        assert_eq!(a.proof_over(&e1), a.proof_over(&e1));
    }
}
