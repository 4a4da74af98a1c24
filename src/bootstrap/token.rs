//! Proving that a side holds the job token over one TLS session.
//!
//! The token ([`JobToken`], in `pki`) never crosses the wire: each side
//! proves it holds it with HMAC-SHA256(token, exporter secret of this TLS
//! session, direction), which a man in the middle (holding a different
//! session) cannot produce or replay.

use crate::pki::JobToken;
use crate::{Error, Result};
use ring::rand::{SecureRandom, SystemRandom};

const EXPORTER_LABEL: &[u8] = b"EXPORTER-rankmesh-join-v1";

/// Which side proves: each direction has its own exporter context, so a
/// proof cannot be reflected back.
#[derive(Clone, Copy, Debug)]
pub enum Direction {
    /// A joining rank proves itself to the seed.
    RankToSeed,
    /// The seed proves itself to a joining rank.
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

/// The session's exporter secret for `direction`.
fn session_secret(conn: &quinn::Connection, direction: Direction) -> Result<[u8; 32]> {
    let mut ekm = [0u8; 32];
    conn.export_keying_material(&mut ekm, EXPORTER_LABEL, direction.context())
        .map_err(|_| Error::auth("cannot export TLS keying material"))?;
    Ok(ekm)
}

/// Proofs of holding the token, bound to a QUIC connection's TLS session.
pub(crate) trait SessionProof {
    /// This side's proof for `direction` on `conn`.
    fn proof(&self, conn: &quinn::Connection, direction: Direction) -> Result<[u8; 32]>;
    /// Whether `proof` is the other side's valid proof on `conn`.
    fn verify(
        &self,
        conn: &quinn::Connection,
        direction: Direction,
        proof: &[u8; 32],
    ) -> Result<bool>;
}

impl SessionProof for JobToken {
    fn proof(&self, conn: &quinn::Connection, direction: Direction) -> Result<[u8; 32]> {
        Ok(self.mac(&session_secret(conn, direction)?))
    }

    fn verify(
        &self,
        conn: &quinn::Connection,
        direction: Direction,
        proof: &[u8; 32],
    ) -> Result<bool> {
        Ok(self.verify_mac(&session_secret(conn, direction)?, proof))
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
    fn proofs_differ_by_token_and_session() {
        let a = JobToken::generate().unwrap();
        let b = JobToken::generate().unwrap();
        let e1 = [1u8; 32];
        let e2 = [2u8; 32];
        assert_ne!(a.mac(&e1), b.mac(&e1));
        assert_ne!(a.mac(&e1), a.mac(&e2));
        assert_eq!(a.mac(&e1), a.mac(&e1));
        assert!(a.verify_mac(&e1, &a.mac(&e1)));
        assert!(!b.verify_mac(&e1, &a.mac(&e1)));
    }
}
