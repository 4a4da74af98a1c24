//! Control messages of the join protocol (rank <-> seed), serialized with
//! postcard behind a fixed prefix.
//!
//! Each message is `prefix (32 bytes) | body (postcard)`; the prefix is
//!
//! | offset | size | field                                                |
//! |-------:|-----:|------------------------------------------------------|
//! | 0      | 8    | magic `b"RANKMESH"`                                   |
//! | 8      | 4    | protocol version, little-endian                      |
//! | 12     | 4    | body length in bytes, little-endian                  |
//! | 16     | 16   | build version (crate version, ASCII, zero padded)    |
//!
//! The prefix layout never changes between versions, so two builds that
//! disagree on the body format can still name both versions in the error.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::net::SocketAddr;

/// Size of the fixed prefix.
pub const PREFIX_LEN: usize = 32;
/// Version of the join protocol this build speaks. It also stands for the
/// rank-to-rank frame semantics, so that ranks that would misread each
/// other's frames are refused at join: 5 numbers point-to-point messages
/// per sender instead of per tag; 6 adds the transport threads' ports to
/// the join request and the peer table, and striped frames.
pub const PROTOCOL_VERSION: u32 = 6;
/// Largest control body accepted (certificates and peer tables fit easily).
pub const MAX_BODY: usize = 4 << 20;
const MAGIC: [u8; 8] = *b"RANKMESH";

/// This build's version string (the crate version).
pub fn build_version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// A decoded prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prefix {
    /// The sender's protocol version.
    pub protocol: u32,
    /// Body length that follows.
    pub body_len: usize,
    /// The sender's build version.
    pub build: String,
}

/// Why a control message was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlError {
    /// Not a rankmesh control stream.
    BadMagic,
    /// The peer speaks another protocol version.
    Version {
        /// Our protocol and build.
        ours: (u32, String),
        /// Theirs.
        theirs: (u32, String),
    },
    /// The body is larger than [`MAX_BODY`].
    TooLarge(usize),
    /// The body does not parse.
    Body(String),
    /// Fewer bytes than announced.
    Truncated,
}

impl std::fmt::Display for ControlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlError::BadMagic => write!(f, "peer is not speaking the rankmesh join protocol"),
            ControlError::Version { ours, theirs } => write!(
                f,
                "protocol version mismatch: this process speaks v{} (rankmesh {}), \
                 the peer v{} (rankmesh {}); run the same rankmesh version everywhere",
                ours.0, ours.1, theirs.0, theirs.1
            ),
            ControlError::TooLarge(n) => {
                write!(
                    f,
                    "control message of {n} bytes exceeds the {MAX_BODY}-byte limit"
                )
            }
            ControlError::Body(e) => write!(f, "malformed control message: {e}"),
            ControlError::Truncated => write!(f, "truncated control message"),
        }
    }
}

impl std::error::Error for ControlError {}

/// Encode a message with the current protocol version.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ControlError> {
    encode_with_version(msg, PROTOCOL_VERSION)
}

/// Encode with an explicit protocol version (compatibility tests).
pub fn encode_with_version<T: Serialize>(msg: &T, protocol: u32) -> Result<Vec<u8>, ControlError> {
    let body = postcard::to_allocvec(msg).map_err(|e| ControlError::Body(e.to_string()))?;
    if body.len() > MAX_BODY {
        return Err(ControlError::TooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(PREFIX_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&protocol.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    let mut build = [0u8; 16];
    let v = build_version().as_bytes();
    let n = v.len().min(16);
    build[..n].copy_from_slice(&v[..n]);
    out.extend_from_slice(&build);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decode and check a prefix: magic, protocol version, body bound.
pub fn decode_prefix(b: &[u8; PREFIX_LEN]) -> Result<Prefix, ControlError> {
    if b[0..8] != MAGIC {
        return Err(ControlError::BadMagic);
    }
    let protocol = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    let body_len = u32::from_le_bytes([b[12], b[13], b[14], b[15]]) as usize;
    let build: String = b[16..32]
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| if c.is_ascii_graphic() { c as char } else { '?' })
        .collect();
    if protocol != PROTOCOL_VERSION {
        return Err(ControlError::Version {
            ours: (PROTOCOL_VERSION, build_version().to_string()),
            theirs: (protocol, build),
        });
    }
    if body_len > MAX_BODY {
        return Err(ControlError::TooLarge(body_len));
    }
    Ok(Prefix {
        protocol,
        body_len,
        build,
    })
}

/// Decode a body whose prefix was already checked.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ControlError> {
    postcard::from_bytes(body).map_err(|e| ControlError::Body(e.to_string()))
}

/// Decode a whole message (prefix and body) from one buffer.
pub fn decode<T: DeserializeOwned>(buf: &[u8]) -> Result<T, ControlError> {
    let pre: &[u8; PREFIX_LEN] = buf
        .get(..PREFIX_LEN)
        .and_then(|s| s.try_into().ok())
        .ok_or(ControlError::Truncated)?;
    let p = decode_prefix(pre)?;
    let body = buf
        .get(PREFIX_LEN..PREFIX_LEN + p.body_len)
        .ok_or(ControlError::Truncated)?;
    decode_body(body)
}

/// Rank -> seed: the first message on the join stream.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct JoinRequest {
    /// HMAC-SHA256(token, exporter(rank->seed)) proving the rank holds the token.
    pub proof: [u8; 32],
    /// Job id the rank was told to join (`None`: whatever job the seed runs).
    pub job_id: Option<String>,
    /// The rank it asks for (`None`: any free rank).
    pub requested_rank: Option<u32>,
    /// World size it expects (`None`: whatever the seed says).
    pub world_size: Option<u32>,
    /// Address its own endpoint listens on for peer connections.
    pub listen: SocketAddr,
    /// UDP ports, on the IP of `listen`, of its transport threads' own
    /// endpoints (empty: one transport thread).
    pub lanes: Vec<u16>,
    /// Host name, for messages that name the rank.
    pub host: String,
    /// Process id, for messages that name the rank.
    pub pid: u32,
    /// A PKCS#10 certificate signing request for the rank's own key (public key only).
    pub csr_der: Vec<u8>,
}

/// Seed -> rank: the answer to a [`JoinRequest`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum JoinReply {
    /// The rank is admitted; formation continues.
    Accepted {
        /// HMAC-SHA256(token, exporter(seed->rank)) proving the seed holds the token.
        proof: [u8; 32],
        /// The rank assigned.
        rank: u32,
        /// World size of the job.
        world_size: u32,
        /// Job id.
        job_id: String,
        /// The job CA certificate (DER).
        ca_der: Vec<u8>,
        /// The rank's leaf certificate, signed by the job CA (DER).
        cert_der: Vec<u8>,
    },
    /// The rank is refused.
    Rejected {
        /// What kind of refusal.
        kind: RejectKind,
        /// Why, in words a person can act on.
        reason: String,
        /// The seed's proof of the job token over this connection (as in
        /// `Accepted`): a joiner acts on a refusal only from the job's
        /// seed, never from a server that merely answered at its address.
        proof: [u8; 32],
    },
}

/// Why a join was refused.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum RejectKind {
    /// The rank could not prove it holds the job token.
    Auth,
    /// The request does not fit the job (rank taken, wrong size, job formed).
    Membership,
    /// The request was malformed or of another version.
    Protocol,
}

/// Rank -> seed, after [`JoinReply::Accepted`]: the rank now accepts peer
/// connections with its new certificate. Formation completes when every
/// rank is ready, so no rank dials a peer that cannot answer yet.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ready {
    /// The rank that is ready.
    pub rank: u32,
}

/// One entry of the peer table.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerInfo {
    /// Address of the peer's endpoint.
    pub addr: SocketAddr,
    /// Ports, on the IP of `addr`, of the endpoints of the peer's extra
    /// transport threads (large messages are striped across them).
    pub lanes: Vec<u16>,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// Which key a connection claiming this member must have.
    pub key: KeyPin,
}

/// The key a peer table pins for a member.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum KeyPin {
    /// The member was given a certificate but has not said it is ready:
    /// connections claiming it wait (unread) for a later table.
    Pending,
    /// The key pin ([`crate::pki::key_pin`]) of the certificate the seed
    /// issued to the member that said it was ready: connections claiming
    /// the member are accepted only with this key.
    Pinned([u8; 32]),
    /// The member's join was abandoned, or it left before it was admitted:
    /// no connection claiming it is accepted.
    Revoked,
}

/// After formation, on the join stream in both directions: a rank asks the
/// seed to end the job, and the seed tells every rank when one left.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Notice {
    /// `rank` left the job (its link to the seed ended), for `reason`.
    RankGone {
        /// The rank.
        rank: u32,
        /// How it ended, in words.
        reason: String,
    },
    /// `rank` ended the job for everyone (`Communicator::abort`).
    Abort {
        /// The rank.
        rank: u32,
        /// Its reason.
        reason: String,
    },
    /// Rank -> seed (elastic jobs): `rank` reached a membership point of
    /// `epoch` (`Communicator::checkpoint` or `recover`).
    Rebuild {
        /// The member asking.
        rank: u32,
        /// The epoch it leaves.
        epoch: u32,
    },
    /// Seed -> rank: the next epoch, once every live member asked.
    Epoch(EpochInfo),
    /// Seed -> rank: the next epoch cannot be formed.
    RebuildFailed {
        /// The epoch the ranks tried to leave.
        epoch: u32,
        /// Why, in words a person can act on.
        reason: String,
    },
}

/// A membership epoch of an elastic job, decided by the seed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochInfo {
    /// The epoch number.
    pub epoch: u32,
    /// Every member the job has had, indexed by member id (a member's id is
    /// the rank its certificate names; ids are never reused).
    pub table: Vec<PeerInfo>,
    /// The epoch's members, in rank order.
    pub members: Vec<u32>,
    /// Members that joined with this epoch.
    pub joined: Vec<u32>,
    /// Members of the previous epoch that are gone.
    pub left: Vec<u32>,
}

/// Seed -> rank, after [`JoinReply::Accepted`]: the outcome of formation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Formation {
    /// Every rank joined.
    Welcome {
        /// Membership epoch.
        epoch: u32,
        /// Peer table in rank order.
        peers: Vec<PeerInfo>,
    },
    /// Formation failed (deadline passed, a rank left).
    Failed {
        /// What happened and who is missing.
        reason: String,
    },
    /// A late joiner of an elastic job is admitted with this epoch.
    Admitted(EpochInfo),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> JoinRequest {
        JoinRequest {
            proof: [7; 32],
            job_id: Some("abc".into()),
            requested_rank: Some(3),
            world_size: Some(4),
            listen: "127.0.0.1:4000".parse().unwrap(),
            lanes: vec![4001, 4002],
            host: "node1".into(),
            pid: 42,
            csr_der: vec![1, 2, 3],
        }
    }

    #[test]
    fn round_trip() {
        let enc = encode(&req()).unwrap();
        assert_eq!(decode::<JoinRequest>(&enc).unwrap(), req());
        let f = Formation::Welcome {
            epoch: 1,
            peers: vec![PeerInfo {
                addr: "10.0.0.1:1".parse().unwrap(),
                lanes: Vec::new(),
                host: "h".into(),
                pid: 1,
                key: KeyPin::Pinned([3; 32]),
            }],
        };
        assert_eq!(decode::<Formation>(&encode(&f).unwrap()).unwrap(), f);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let enc = encode(&req()).unwrap();
        for n in 0..enc.len() {
            assert!(decode::<JoinRequest>(&enc[..n]).is_err(), "prefix {n}");
        }
    }

    #[test]
    fn version_mismatch_names_both_versions() {
        let enc = encode_with_version(&req(), 99).unwrap();
        let e = decode::<JoinRequest>(&enc).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains(&format!("v{PROTOCOL_VERSION}")) && s.contains("v99"),
            "{s}"
        );
        assert!(s.contains(build_version()), "{s}");
    }

    #[test]
    fn oversized_and_garbage_bodies_are_refused() {
        let mut enc = encode(&req()).unwrap();
        enc[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode::<JoinRequest>(&enc),
            Err(ControlError::TooLarge(_))
        ));
        let mut enc = encode(&req()).unwrap();
        for b in enc[PREFIX_LEN..].iter_mut() {
            *b = 0xff;
        }
        assert!(decode::<JoinRequest>(&enc).is_err());
        assert_eq!(
            decode::<JoinRequest>(&[0u8; 40]),
            Err(ControlError::BadMagic)
        );
    }
}
