//! rustls configurations: rank-to-rank mutual TLS pinned to the job CA, and
//! the rank-to-seed first contact whose trust comes from the token proof.

use super::{parse_rank_dns_name, Credentials};
use crate::{Error, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use std::sync::Arc;

/// ALPN of rank-to-rank connections.
pub const ALPN_PEER: &[u8] = b"rankmesh/1";
/// ALPN of rank-to-seed connections.
pub const ALPN_JOIN: &[u8] = b"rankmesh-join/1";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::auth(format!("{what}: {e}"))
}

fn roots(ca: &CertificateDer<'static>) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.clone())
        .map_err(|e| tls_err("job CA certificate is unusable", e))?;
    Ok(Arc::new(roots))
}

fn client_verifier(ca: &CertificateDer<'static>) -> Result<Arc<dyn ClientCertVerifier>> {
    WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
        .build()
        .map_err(|e| tls_err("client verifier", e))
}

/// Check that `cert` is a valid leaf issued by `ca`.
pub(crate) fn verify_chain(
    ca: &CertificateDer<'static>,
    cert: &CertificateDer<'static>,
) -> Result<()> {
    client_verifier(ca)?
        .verify_client_cert(cert, &[], UnixTime::now())
        .map(|_| ())
        .map_err(|e| tls_err("certificate does not chain to the job CA", e))
}

/// The rank a certificate of job `job_id` names.
pub fn rank_from_cert(cert: &CertificateDer<'_>, job_id: &str) -> Result<usize> {
    let ee = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| tls_err("unreadable peer certificate", e))?;
    let mut found = None;
    for name in ee.valid_dns_names() {
        if let Some(r) = parse_rank_dns_name(name, job_id) {
            if found.is_some_and(|f| f != r) {
                return Err(Error::auth("peer certificate names more than one rank"));
            }
            found = Some(r);
        }
    }
    found.ok_or_else(|| Error::auth(format!("peer certificate names no rank of job {job_id}")))
}

/// Server side of rank-to-rank connections: requires a client certificate
/// issued by the job CA. The client's rank is read from its certificate by
/// the transport after the handshake.
pub fn peer_server_config(creds: &Credentials) -> Result<ServerConfig> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err("TLS versions", e))?
        .with_client_cert_verifier(client_verifier(&creds.ca)?)
        .with_single_cert(vec![creds.cert.clone()], creds.key())
        .map_err(|e| tls_err("rank certificate", e))?;
    cfg.alpn_protocols = vec![ALPN_PEER.to_vec()];
    Ok(cfg)
}

/// Client side of rank-to-rank connections: the server must present a
/// certificate of the job CA whose name is the rank being dialed (the server
/// name passed to `connect` is [`super::rank_dns_name`]).
pub fn peer_client_config(creds: &Credentials) -> Result<ClientConfig> {
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots(&creds.ca)?, provider())
            .build()
            .map_err(|e| tls_err("server verifier", e))?;
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err("TLS versions", e))?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(vec![creds.cert.clone()], creds.key())
        .map_err(|e| tls_err("rank certificate", e))?;
    cfg.alpn_protocols = vec![ALPN_PEER.to_vec()];
    Ok(cfg)
}

/// The seed's server side: no client certificates (joining ranks have none
/// yet); ranks prove the job token inside the session instead.
pub fn seed_server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err("TLS versions", e))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| tls_err("seed certificate", e))?;
    cfg.alpn_protocols = vec![ALPN_JOIN.to_vec()];
    Ok(cfg)
}

/// A rank's first contact with the seed. The rank cannot check the seed's
/// chain yet (it does not know the CA), so the certificate is accepted but
/// the handshake signature is still verified; the seed then proves the job
/// token over this session's exporter secret before the rank trusts it.
pub fn seed_client_config() -> Result<ClientConfig> {
    let p = provider();
    let mut cfg = ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err("TLS versions", e))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(FirstContact { provider: p }))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN_JOIN.to_vec()];
    Ok(cfg)
}

#[derive(Debug)]
struct FirstContact {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for FirstContact {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        // Trust is established by the token proof that follows the handshake.
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not supported".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
