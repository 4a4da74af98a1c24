//! The job's ephemeral PKI: a CA that lives only in the seed's memory, CSR
//! signing, rank identities in certificates, and rustls configurations that
//! trust only the job CA.
//!
//! Owns certificate names (`r{rank}.j{job}.rankmesh`), key generation on the
//! rank side, and the verifiers. Must not touch sockets or the join protocol.

mod ca;
mod tls;
mod token;

pub use ca::JobCa;
pub use tls::{
    peer_client_config, peer_server_config, rank_from_cert, seed_client_config, seed_server_config,
    ALPN_JOIN, ALPN_PEER,
};
pub use token::JobToken;

use crate::{Error, Result};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// DNS name a rank's certificate carries and its peers dial by.
pub fn rank_dns_name(job_id: &str, rank: usize) -> String {
    format!("r{rank}.j{job_id}.rankmesh")
}

/// URI name a rank's certificate carries (job id and rank, human readable).
pub fn rank_uri(job_id: &str, rank: usize) -> String {
    format!("rankmesh://job/{job_id}/rank/{rank}")
}

/// DNS name of the seed's certificate.
pub fn seed_dns_name(job_id: &str) -> String {
    format!("seed.j{job_id}.rankmesh")
}

/// Parse `r{rank}.j{job}.rankmesh` for the given job.
pub fn parse_rank_dns_name(name: &str, job_id: &str) -> Option<usize> {
    let rest = name.strip_prefix('r')?;
    let (rank, tail) = rest.split_once('.')?;
    if tail != format!("j{job_id}.rankmesh") || rank.is_empty() {
        return None;
    }
    if !rank.bytes().all(|b| b.is_ascii_digit()) || (rank.len() > 1 && rank.starts_with('0')) {
        return None;
    }
    rank.parse().ok()
}

/// A job id is 1..=40 lowercase hex digits or dashes (it is part of DNS names).
pub fn validate_job_id(job_id: &str) -> Result<()> {
    let ok = !job_id.is_empty()
        && job_id.len() <= 40
        && job_id
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b == b'-')
        && !job_id.starts_with('-')
        && !job_id.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::config(format!(
            "job id {job_id:?} is invalid: use 1 to 40 characters of [a-z0-9-]"
        )))
    }
}

/// The key pin of a certificate: SHA-256 of its DER SubjectPublicKeyInfo.
/// The seed puts the pin of the certificate it issued to each admitted
/// member in the peer table; a rank accepts a connection as that member
/// only from that key (a certificate of the job CA naming the member is not
/// enough: the seed may have issued one to a join that was then abandoned).
pub fn key_pin(cert: &CertificateDer<'_>) -> Result<[u8; 32]> {
    let ee = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| Error::auth(format!("unreadable certificate: {e}")))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, ee.subject_public_key_info().as_ref());
    let mut pin = [0u8; 32];
    pin.copy_from_slice(digest.as_ref());
    Ok(pin)
}

/// A rank's key pair, generated locally; the private key never leaves the process.
pub struct RankKey {
    key: rcgen::KeyPair,
}

impl RankKey {
    /// Generate a fresh P-256 key pair.
    pub fn generate() -> Result<RankKey> {
        let key = rcgen::KeyPair::generate()
            .map_err(|e| Error::auth(format!("cannot generate a key pair: {e}")))?;
        Ok(RankKey { key })
    }

    /// A CSR carrying only the public key; the seed decides the names.
    pub fn csr_der(&self) -> Result<Vec<u8>> {
        let params = rcgen::CertificateParams::new(Vec::<String>::new())
            .map_err(|e| Error::auth(format!("cannot build a CSR: {e}")))?;
        let csr = params
            .serialize_request(&self.key)
            .map_err(|e| Error::auth(format!("cannot sign the CSR: {e}")))?;
        Ok(csr.der().to_vec())
    }

    /// The private key in PKCS#8 DER, for rustls.
    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }
}

/// Everything a rank needs for mutual TLS with its peers.
#[derive(Debug)]
pub struct Credentials {
    /// The job id.
    pub job_id: String,
    /// This rank.
    pub rank: usize,
    /// The job CA certificate.
    pub ca: CertificateDer<'static>,
    /// This rank's leaf certificate.
    pub cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl Credentials {
    /// Assemble credentials after checking that `cert` names `rank` of
    /// `job_id`, chains to `ca`, and carries `key`'s public key.
    pub fn new(
        job_id: &str,
        rank: usize,
        ca: CertificateDer<'static>,
        cert: CertificateDer<'static>,
        key: &RankKey,
    ) -> Result<Credentials> {
        let named = rank_from_cert(&cert, job_id)?;
        if named != rank {
            return Err(Error::auth(format!(
                "the seed issued a certificate for rank {named} but assigned rank {rank}"
            )));
        }
        tls::verify_chain(&ca, &cert)?;
        let ee = webpki::EndEntityCert::try_from(&cert)
            .map_err(|e| Error::auth(format!("unreadable leaf certificate: {e}")))?;
        let spki = ee.subject_public_key_info();
        use rcgen::PublicKeyData;
        if !spki.as_ref().ends_with(key.key.der_bytes()) {
            return Err(Error::auth(
                "the seed issued a certificate for a key this rank does not hold",
            ));
        }
        let key = match key.private_key_der() {
            PrivateKeyDer::Pkcs8(k) => k,
            _ => return Err(Error::auth("unexpected private key encoding")),
        };
        Ok(Credentials {
            job_id: job_id.to_string(),
            rank,
            ca,
            cert,
            key,
        })
    }

    pub(crate) fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_reject_lookalikes() {
        let n = rank_dns_name("ab12", 17);
        assert_eq!(parse_rank_dns_name(&n, "ab12"), Some(17));
        assert_eq!(parse_rank_dns_name(&n, "ab13"), None);
        assert_eq!(parse_rank_dns_name("r01.jab12.rankmesh", "ab12"), None);
        assert_eq!(parse_rank_dns_name("r.jab12.rankmesh", "ab12"), None);
        assert_eq!(parse_rank_dns_name("rx.jab12.rankmesh", "ab12"), None);
        assert_eq!(parse_rank_dns_name("seed.jab12.rankmesh", "ab12"), None);
        assert_eq!(parse_rank_dns_name("r0.jab12.rankmesh", "ab12"), Some(0));
        validate_job_id("0123abcd").unwrap();
        assert!(validate_job_id("").is_err());
        assert!(validate_job_id("UPPER").is_err());
        assert!(validate_job_id("a.b").is_err());
    }

    #[test]
    fn ca_signs_csr_into_credentials_naming_the_rank() {
        let ca = JobCa::new("feed01", std::time::Duration::from_secs(3600)).unwrap();
        let key = RankKey::generate().unwrap();
        let cert = ca.sign_rank(&key.csr_der().unwrap(), 3).unwrap();
        let creds = Credentials::new("feed01", 3, ca.cert_der(), cert.clone(), &key).unwrap();
        assert_eq!(creds.rank, 3);
        assert_eq!(rank_from_cert(&cert, "feed01").unwrap(), 3);
        // The wrong rank, a foreign CA and a foreign key are all refused.
        assert!(Credentials::new("feed01", 2, ca.cert_der(), cert.clone(), &key).is_err());
        let other = JobCa::new("feed02", std::time::Duration::from_secs(3600)).unwrap();
        assert!(Credentials::new("feed01", 3, other.cert_der(), cert.clone(), &key).is_err());
        let key2 = RankKey::generate().unwrap();
        assert!(Credentials::new("feed01", 3, ca.cert_der(), cert, &key2).is_err());
    }

    #[test]
    fn the_key_pin_is_the_hash_of_the_subject_public_key_info() {
        use rcgen::PublicKeyData;
        let ca = JobCa::new("feed04", std::time::Duration::from_secs(3600)).unwrap();
        let key = RankKey::generate().unwrap();
        let a = ca.sign_rank(&key.csr_der().unwrap(), 1).unwrap();
        let b = ca.sign_rank(&key.csr_der().unwrap(), 1).unwrap();
        let spki = key.key.subject_public_key_info();
        let want = ring::digest::digest(&ring::digest::SHA256, &spki);
        assert_eq!(&key_pin(&a).unwrap()[..], want.as_ref());
        // Two certificates for one key pin alike; another key does not.
        assert_ne!(a, b);
        assert_eq!(key_pin(&a).unwrap(), key_pin(&b).unwrap());
        let other = RankKey::generate().unwrap();
        let c = ca.sign_rank(&other.csr_der().unwrap(), 1).unwrap();
        assert_ne!(key_pin(&a).unwrap(), key_pin(&c).unwrap());
        assert!(key_pin(&CertificateDer::from(vec![0x30, 0x00])).is_err());
    }

    #[test]
    fn garbage_csr_is_refused() {
        let ca = JobCa::new("feed03", std::time::Duration::from_secs(3600)).unwrap();
        assert!(ca.sign_rank(&[0x30, 0x03, 1, 2, 3], 0).is_err());
        assert!(ca.sign_rank(&[], 0).is_err());
    }
}
