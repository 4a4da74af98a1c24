//! Elastic membership: ranks join at checkpoints and lost ranks are
//! dropped, without restarting anyone who did not fail.
//!
//! Every process has a member id (the world rank its certificate names,
//! never reused). An epoch is a list of member ids in rank order. At a
//! membership point ([`Communicator::checkpoint`], [`Communicator::recover`])
//! every live member tells the seed; once all have, the seed decides the
//! next epoch (the live members in their old order, then the processes
//! waiting to join) and tells everyone, joiners included. Each rank then
//! builds a new communicator for that epoch (the old one is left as it was;
//! frames carry the epoch, so old traffic never matches new calls) and the
//! new rank 0 broadcasts the application's state.

use super::{Communicator, EpochNews, Inner, World};
use crate::wire::control::EpochInfo;
use crate::{Error, Result};
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

/// What a membership point changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    /// The new epoch.
    pub epoch: u32,
    /// This process's rank in the new communicator.
    pub rank: usize,
    /// Number of ranks in the new communicator.
    pub size: usize,
    /// This process's rank before (`None` for a process that just joined).
    pub previous_rank: Option<usize>,
    /// Ranks, in the new communicator, of the processes that joined.
    pub joined: Vec<usize>,
    /// Ranks, in the previous communicator, of the members that are gone.
    pub left: Vec<usize>,
}

impl Membership {
    /// Whether anything changed.
    pub fn changed(&self) -> bool {
        !self.joined.is_empty() || !self.left.is_empty()
    }
}

/// The outcome of a membership point: the communicator to use from now on,
/// the state rank 0 passed, and what changed.
#[derive(Debug)]
pub struct Rebuilt {
    /// The communicator of the new epoch.
    pub comm: Communicator,
    /// The state the new rank 0 passed to [`Communicator::checkpoint`].
    pub state: Vec<u8>,
    /// What changed.
    pub membership: Membership,
}

impl Communicator {
    /// A membership point of an elastic job (started with `rankrun --elastic
    /// MIN:MAX`): every rank of this communicator calls it with the
    /// application's state (parameters, optimizer state, step: whatever a
    /// newcomer needs; only the new rank 0's copy is used). Processes
    /// waiting to join (`rankrun --join`) are admitted, ranks that were lost
    /// are dropped, every rank gets a new communicator with dense ranks and
    /// a new epoch, and the state is broadcast from the new rank 0. When
    /// nothing changed the new communicator has the same ranks.
    ///
    /// Collective over the *live* members: a member that died does not hold
    /// it up (the seed notices its departure). Bounded by the operation
    /// timeout.
    pub async fn checkpoint(&self, state: &[u8]) -> Result<Rebuilt> {
        self.membership_point("checkpoint", state).await
    }

    /// After an operation failed because a rank was lost
    /// ([`Error::PeerLost`]): the survivors call this with their last
    /// committed state and continue in a new epoch without the lost ranks,
    /// as long as at least the job's minimum remain. The same membership
    /// point as [`Communicator::checkpoint`] (joiners waiting are admitted
    /// too).
    pub async fn recover(&self, state: &[u8]) -> Result<Rebuilt> {
        self.membership_point("recover", state).await
    }

    async fn membership_point(&self, what: &str, state: &[u8]) -> Result<Rebuilt> {
        let op = format!("{what} (epoch {})", self.inner.epoch);
        let world = self.inner.world.clone();
        let me = world.transport.rank();
        let mut epoch = self.inner.epoch;
        loop {
            let info = next_epoch(&world, me, epoch, &op, self.rank()).await?;
            let next = info.epoch;
            match enter_epoch(world.clone(), info, Some(self.rank()), Vec::new(), state).await {
                Ok(mut r) => {
                    // What changed since this communicator, over every
                    // epoch this membership point went through.
                    let now: Vec<usize> = r.comm.inner.members.clone();
                    r.membership.left = (0..self.size())
                        .filter(|&i| !now.contains(&self.inner.members[i]))
                        .collect();
                    r.membership.joined = (0..now.len())
                        .filter(|&i| !self.inner.members.contains(&now[i]))
                        .collect();
                    return Ok(r);
                }
                // A member of the new epoch was lost while the state was
                // passed: agree on the next one without it.
                Err(e) if lost(&e) => epoch = next,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Whether `e` means a rank was lost (a membership point can go on
/// without it).
fn lost(e: &Error) -> bool {
    matches!(e, Error::PeerLost { .. } | Error::Aborted { .. })
}

/// Tell the seed this member (world rank `me`) reached a membership point
/// of `epoch`, and wait for its decision.
async fn next_epoch(
    world: &Arc<World>,
    me: usize,
    epoch: u32,
    op: &str,
    rank: usize,
) -> Result<EpochInfo> {
    let Some(seed) = world.seed.as_ref() else {
        return Err(Error::Membership {
            detail: format!(
                "rank {rank}: {op}: this job has no seed to agree on membership with (elastic \
                 jobs are started by rankrun --elastic MIN:MAX)"
            ),
        });
    };
    let mut news = world.epochs.subscribe();
    news.borrow_and_update();
    seed.request_rebuild(me, epoch)
        .await
        .map_err(|e| Error::Membership {
            detail: format!("rank {rank}: {op}: cannot reach the seed: {e}"),
        })?;
    let limit = world.config.op_timeout();
    let wait = async {
        loop {
            if let Some(n) = news.borrow_and_update().clone() {
                match n {
                    EpochNews::Next(info) if info.epoch > epoch => return Ok(info),
                    EpochNews::Failed { epoch: e, reason } if e == epoch => return Err(reason),
                    _ => {}
                }
            }
            if news.changed().await.is_err() {
                return Err("the link to the seed ended".to_string());
            }
        }
    };
    match tokio::time::timeout(limit, wait).await {
        Ok(Ok(info)) => Ok(info),
        Ok(Err(reason)) => Err(Error::Membership {
            detail: format!("rank {rank}: {op}: {reason}"),
        }),
        Err(_) => Err(Error::Membership {
            detail: format!(
                "rank {rank}: {op}: the seed did not decide the next epoch within {limit:?}: a \
                 live rank has not reached this membership point (every rank must call it)"
            ),
        }),
    }
}

/// A process admitted with `info` enters its epoch; if a member is lost
/// while the state is passed, it goes through the next membership point.
pub(crate) async fn enter_admitted(world: Arc<World>, mut info: EpochInfo) -> Result<Rebuilt> {
    let me = world.transport.rank();
    loop {
        let epoch = info.epoch;
        match enter_epoch(world.clone(), info, None, Vec::new(), &[]).await {
            Err(e) if lost(&e) => {
                info = next_epoch(&world, me, epoch, "joining", 0).await?;
            }
            other => return other,
        }
    }
}

fn info_epoch(c: &Communicator) -> u32 {
    c.inner.epoch
}

/// Build the communicator of `info`'s epoch on this process and pass the
/// state from its rank 0.
pub(crate) async fn enter_epoch(
    world: Arc<World>,
    info: EpochInfo,
    previous_rank: Option<usize>,
    left: Vec<usize>,
    state: &[u8],
) -> Result<Rebuilt> {
    let me = world.transport.rank();
    let members: Vec<usize> = info.members.iter().map(|&m| m as usize).collect();
    let Some(rank) = members.iter().position(|&m| m == me) else {
        return Err(Error::Membership {
            detail: format!(
                "member {me} is not part of epoch {} (its members are {:?})",
                info.epoch, members
            ),
        });
    };
    world.transport.add_peers(&info.table)?;
    let joined = info
        .joined
        .iter()
        .filter_map(|id| info.members.iter().position(|m| m == id))
        .collect();
    let comm = Communicator {
        inner: Arc::new(Inner {
            world,
            comm_id: 0,
            epoch: info.epoch,
            rank,
            members,
            p2p_next: Mutex::new(HashMap::new()),
            coll_seq: AtomicU64::new(0),
        }),
    };
    // The state, from the new rank 0 (a survivor whenever one is left).
    let mut len = [state.len() as u64];
    comm.broadcast(&mut len, 0).await?;
    let limit = comm.config().max_message_bytes();
    if len[0] > limit {
        return Err(Error::InvalidArgument {
            rank: comm.rank(),
            op: format!("checkpoint (epoch {})", info_epoch(&comm)),
            detail: format!(
                "the state is {} bytes, more than the largest message ({limit} bytes); raise \
                 Config::set_max_message_bytes",
                len[0]
            ),
        });
    }
    let mut bytes = if comm.rank() == 0 {
        state.to_vec()
    } else {
        vec![0u8; len[0] as usize]
    };
    comm.broadcast(&mut bytes, 0).await?;
    let membership = Membership {
        epoch: info.epoch,
        rank: comm.rank(),
        size: comm.size(),
        previous_rank,
        joined,
        left,
    };
    tracing::info!(
        rank = membership.rank,
        "epoch {}: {} rank(s) ({} joined, {} left)",
        membership.epoch,
        membership.size,
        membership.joined.len(),
        membership.left.len()
    );
    Ok(Rebuilt {
        comm,
        state: bytes,
        membership,
    })
}
