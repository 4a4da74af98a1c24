//! Forming a job: the seed (a sans-IO formation state machine plus a thin
//! QUIC driver) and the rank's side of the join protocol.
//!
//! Protocol (one bidirectional stream per joining rank, messages of
//! `wire::control`):
//! 1. rank -> seed: `JoinRequest` with the rank's token proof and a CSR;
//! 2. seed -> rank: `JoinReply::Accepted` with the seed's token proof, the
//!    assigned rank, the job CA and the signed leaf (or `Rejected`);
//! 3. seed -> rank, once every rank joined: `Formation::Welcome` with the
//!    peer table (or `Failed`, naming the missing ranks).
//!
//! Must not depend on `coll` or `comm`.

pub mod elastic;
mod join;
mod seed;
pub mod state;
mod token;

pub use crate::env::JoinSpec;
pub use crate::pki::JobToken;
pub use join::{join, join_with_lanes, Joined, Notices, SeedLink};
pub use seed::{Seed, SeedConfig};
pub use token::random_job_id;

use crate::wire::control::{self, ControlError, PREFIX_LEN};

/// Close codes on a connection between a rank and the seed.
mod close {
    /// The rank finalized, or the seed shut down.
    pub const BYE: u32 = 0;
    /// The rank stopped after an error, or the seed refused its join.
    pub const FAILED: u32 = 1;
    /// The rank sent a control message the seed could not read.
    pub const BAD_MESSAGE: u32 = 2;
}
use crate::{Error, Result};
use serde::{de::DeserializeOwned, Serialize};

fn control_error(peer: &str, e: ControlError) -> Error {
    match e {
        ControlError::Version { .. } => Error::protocol(format!("{peer}: {e}")),
        other => Error::protocol(format!("{peer} sent an invalid join message: {other}")),
    }
}

/// Read one control message from a stream.
async fn read_msg<T: DeserializeOwned>(s: &mut quinn::RecvStream, peer: &str) -> Result<T> {
    read_msg_max(s, peer, control::MAX_BODY).await
}

/// Read one control message whose body is at most `max` bytes (checked
/// before the body is allocated).
async fn read_msg_max<T: DeserializeOwned>(
    s: &mut quinn::RecvStream,
    peer: &str,
    max: usize,
) -> Result<T> {
    let mut pre = [0u8; PREFIX_LEN];
    s.read_exact(&mut pre)
        .await
        .map_err(|e| Error::protocol(format!("{peer} ended the join exchange: {e}")))?;
    let p = control::decode_prefix(&pre).map_err(|e| control_error(peer, e))?;
    if p.body_len > max {
        return Err(Error::protocol(format!(
            "{peer} sent a join message of {} bytes; at most {max} are accepted here",
            p.body_len
        )));
    }
    let mut body = vec![0u8; p.body_len];
    s.read_exact(&mut body)
        .await
        .map_err(|e| Error::protocol(format!("{peer} ended the join exchange: {e}")))?;
    control::decode_body(&body).map_err(|e| control_error(peer, e))
}

/// Write one control message to a stream.
async fn write_msg<T: Serialize>(s: &mut quinn::SendStream, msg: &T) -> Result<()> {
    let buf = control::encode(msg).map_err(|e| Error::protocol(e.to_string()))?;
    s.write_all(&buf)
        .await
        .map_err(|e| Error::transport(None, format!("join exchange: {e}")))
}
