//! The [`Communicator`]: a rank's handle on a group of ranks, with
//! point-to-point messaging and (in `coll`) the collectives.
//!
//! Owns the mapping from communicator ranks to world ranks, the sequence
//! numbers, bounded waits and the translation of transport failures into
//! errors that name ranks and operations. Must not touch quinn directly.

mod abort;
mod call;
mod coll;
mod device;
mod elastic;
mod init;
mod ledger;
mod p2p;
mod recorder;

pub use elastic::{Membership, Rebuilt};
pub use init::{
    init, init_elastic, init_elastic_with, init_elastic_with_config, init_with, init_with_config,
};

use crate::bootstrap::SeedLink;
use crate::config::Config;
use crate::transport::{Abort, Failure, Transport};
use crate::wire::control::Notice;
use crate::{Error, Result};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the seed said about the next membership epoch.
#[derive(Clone, Debug)]
pub(crate) enum EpochNews {
    Next(crate::wire::control::EpochInfo),
    Failed { epoch: u32, reason: String },
}

/// Per-process state shared by every communicator of a rank.
pub(crate) struct World {
    pub(crate) transport: Arc<dyn Transport>,
    /// Aborted and recently finished collectives (the mailbox consults it).
    pub(crate) ledger: Arc<ledger::Ledger>,
    pub(crate) config: Config,
    pub(crate) job_id: String,
    seed: Option<SeedLink>,
    finalized: AtomicBool,
    /// Recent operations, for hang reports, dumps and traces.
    pub(crate) recorder: recorder::Recorder,
    /// Numbers point-to-point operations for the recorder.
    p2p_ops: AtomicU64,
    /// Helper tasks that live as long as this world (the SIGUSR1 listener).
    helpers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Notices still being sent in the background (the skip of a cancelled
    /// send); a graceful finish lets them out before the goodbye.
    pub(crate) notices: Mutex<tokio::task::JoinSet<()>>,
    /// The seed's latest membership decision (elastic jobs).
    pub(crate) epochs: tokio::sync::watch::Sender<Option<EpochNews>>,
    /// Listens to the seed's notices (a rank left; the job was aborted).
    listener: Option<tokio::task::JoinHandle<()>>,
}

impl World {
    pub(crate) fn new(
        transport: Arc<dyn Transport>,
        config: Config,
        job_id: String,
        seed: Option<SeedLink>,
    ) -> World {
        let epochs = tokio::sync::watch::channel(None).0;
        let news = epochs.clone();
        let listener = seed.as_ref().and_then(|s| s.notices()).map(|mut notices| {
            let t = transport.clone();
            tokio::spawn(async move {
                while let Some(n) = notices.next().await {
                    match n {
                        // A connected peer's own connection tells, in order
                        // with its data (Bye, close); the seed's notice is for
                        // peers this rank never talked to.
                        Notice::RankGone { rank, reason } if !t.connected(rank as usize) => {
                            t.mailbox().fail_peer(rank as usize, &reason)
                        }
                        Notice::RankGone { .. } => {}
                        Notice::Abort { rank, reason } => {
                            t.mailbox().abort_job(rank as usize, &reason)
                        }
                        Notice::Epoch(info) => {
                            news.send_replace(Some(EpochNews::Next(info)));
                        }
                        Notice::RebuildFailed { epoch, reason } => {
                            news.send_replace(Some(EpochNews::Failed { epoch, reason }));
                        }
                        Notice::Rebuild { .. } => {}
                    }
                }
            })
        });
        let ledger = Arc::new(ledger::Ledger::default());
        if !transport.mailbox().set_coll_check(ledger.clone()) {
            tracing::error!(
                rank = transport.rank(),
                "a second world on one transport: its collective aborts and mismatches are \
                 checked against the first world's records"
            );
        }
        World {
            ledger,
            recorder: recorder::Recorder::new(transport.rank(), &job_id, &config),
            p2p_ops: AtomicU64::new(0),
            helpers: Mutex::new(Vec::new()),
            notices: Mutex::new(tokio::task::JoinSet::new()),
            epochs,
            transport,
            config,
            job_id,
            seed,
            finalized: AtomicBool::new(false),
            listener,
        }
    }

    /// End this rank's participation: `graceful` waits (bounded) for
    /// connected peers to finish with us; otherwise peers learn at once that
    /// this rank stopped after an error.
    pub(crate) async fn finish(&self, graceful: bool) {
        if self.finalized.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(l) = &self.listener {
            l.abort();
        }
        self.stop_helpers();
        self.write_trace();
        let mut notices =
            std::mem::take(&mut *self.notices.lock().unwrap_or_else(|p| p.into_inner()));
        if graceful {
            // Bounded by the notices' own timeout.
            while notices.join_next().await.is_some() {}
        }
        notices.abort_all();
        self.transport.shutdown(graceful).await;
        if let Some(s) = &self.seed {
            let why = if graceful {
                "rank finalized"
            } else {
                "rank stopped after an error"
            };
            s.close(graceful, why);
        }
    }

    /// Write the trace file, if one is configured (logs a failure).
    pub(crate) fn write_trace(&self) {
        if let Err(e) = self.recorder.write_trace() {
            tracing::warn!(
                rank = self.transport.rank(),
                "cannot write the trace file: {e}"
            );
        }
    }

    /// Keep `task` running until this world ends.
    pub(crate) fn adopt(&self, task: tokio::task::JoinHandle<()>) {
        self.helpers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task);
    }

    fn stop_helpers(&self) {
        for t in self
            .helpers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }

    /// The next point-to-point operation number.
    pub(crate) fn next_p2p_op(&self) -> u64 {
        self.p2p_ops.fetch_add(1, Ordering::Relaxed)
    }

    /// End the job for every rank: the seed relays `reason` to all.
    pub(crate) async fn abort(&self, rank: usize, reason: &str) {
        if let Some(s) = &self.seed {
            let _ =
                tokio::time::timeout(Duration::from_secs(2), s.request_abort(rank, reason)).await;
        }
        let me = self.transport.rank();
        self.transport.mailbox().abort_job(me, reason);
        self.finish(false).await;
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(l) = &self.listener {
            l.abort();
        }
        self.stop_helpers();
        if self.finalized.load(Ordering::Acquire) {
            return;
        }
        self.write_trace();
        // Dropped without finalize: finish gracefully in the background if a
        // runtime is still there; otherwise the transport closes on drop.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let t = self.transport.clone();
            let seed = self.seed.take();
            rt.spawn(async move {
                t.shutdown(true).await;
                if let Some(s) = seed {
                    s.close(true, "rank finalized");
                }
            });
        }
    }
}

struct Inner {
    world: Arc<World>,
    comm_id: u64,
    epoch: u32,
    rank: usize,
    /// World rank of each member, in communicator rank order.
    members: Vec<usize>,
    /// Next point-to-point message number per destination (one sequence
    /// across tags: the receiver orders by it).
    p2p_next: Mutex<HashMap<usize, u64>>,
    /// Sequence number of the next collective.
    coll_seq: AtomicU64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle of this communicator is gone: nothing can receive
        // on it any more, so what is kept for it goes too.
        self.world
            .transport
            .mailbox()
            .forget_comm(self.comm_id, self.epoch);
        self.world.ledger.forget_comm(self.comm_id, self.epoch);
    }
}

/// A group of ranks that communicate; cheap to clone, usable from many tasks.
///
/// All operations are `async` and bounded by the configured operation
/// timeout. Collective operations must be called in the same order on every
/// rank of the communicator.
#[derive(Clone)]
pub struct Communicator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Communicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Communicator")
            .field("rank", &self.rank())
            .field("size", &self.size())
            .field("comm_id", &self.inner.comm_id)
            .field("epoch", &self.inner.epoch)
            .finish()
    }
}

impl Communicator {
    pub(crate) fn world(world: Arc<World>, epoch: u32) -> Communicator {
        let n = world.transport.size();
        let rank = world.transport.rank();
        Communicator {
            inner: Arc::new(Inner {
                world,
                comm_id: 0,
                epoch,
                rank,
                members: (0..n).collect(),
                p2p_next: Mutex::new(HashMap::new()),
                coll_seq: AtomicU64::new(0),
            }),
        }
    }

    /// A communicator over `members` (world ranks, in rank order) of the
    /// same world, in which this rank is `rank`.
    fn derive(&self, comm_id: u64, rank: usize, members: Vec<usize>) -> Communicator {
        Communicator {
            inner: Arc::new(Inner {
                world: self.inner.world.clone(),
                comm_id,
                epoch: self.inner.epoch,
                rank,
                members,
                p2p_next: Mutex::new(HashMap::new()),
                coll_seq: AtomicU64::new(0),
            }),
        }
    }

    /// This rank's number in the communicator, `0..size()`.
    pub fn rank(&self) -> usize {
        self.inner.rank
    }

    /// Number of ranks in the communicator.
    pub fn size(&self) -> usize {
        self.inner.members.len()
    }

    /// How this rank's messages reach `rank` of this communicator: over
    /// QUIC, over the same-host channel, or not decided yet (the path is
    /// chosen at the first message to that rank; and for this rank itself).
    /// For checking that ranks placed on one host really talk over the fast
    /// path.
    pub fn path_to(&self, rank: usize) -> Result<crate::transport::PeerPath> {
        self.check_rank(|| "path_to".into(), "rank", rank)?;
        Ok(self.transport().path(self.world_rank(rank)))
    }

    /// The job id.
    pub fn job_id(&self) -> &str {
        &self.inner.world.job_id
    }

    /// The settings this rank runs with.
    pub fn config(&self) -> &Config {
        &self.inner.world.config
    }

    /// Leave the job cleanly: wait (bounded by [`Config::set_linger`]) until
    /// every connected peer has finished with this rank, then close. Call it
    /// once at the end of the program; afterwards every operation fails.
    /// Dropping the last handle does the same in the background.
    pub async fn finalize(&self) -> Result<()> {
        self.inner.world.finish(true).await;
        Ok(())
    }

    /// End the job for every rank: every rank's pending and later
    /// operations fail with [`Error::Aborted`] naming this rank and
    /// `reason`. This rank is finished afterwards. Peers learn through the
    /// seed, and at once over any connection they share with this rank.
    pub async fn abort(&self, reason: &str) {
        let world_rank = self.world_rank(self.rank());
        self.inner.world.abort(world_rank, reason).await;
    }

    /// Stop at once after an error: peers waiting on this rank fail
    /// immediately with an error naming it.
    pub async fn shutdown_after_error(&self) {
        self.inner.world.finish(false).await;
    }

    pub(crate) fn world_handle(&self) -> Arc<World> {
        self.inner.world.clone()
    }

    pub(crate) fn transport(&self) -> &dyn Transport {
        &*self.inner.world.transport
    }

    fn world_rank(&self, rank: usize) -> usize {
        self.inner.members[rank]
    }

    fn comm_rank_of(&self, world_rank: usize) -> Option<usize> {
        self.inner.members.iter().position(|&w| w == world_rank)
    }

    /// `op` names the operation (formatted only for the error).
    fn check_rank(&self, op: impl FnOnce() -> String, what: &str, r: usize) -> Result<()> {
        if r >= self.size() {
            return Err(Error::InvalidArgument {
                rank: self.rank(),
                op: op(),
                detail: format!(
                    "{what} {r} is out of range: the communicator has ranks 0..{}",
                    self.size().saturating_sub(1)
                ),
            });
        }
        Ok(())
    }

    /// `op` names the operation (formatted only for the error).
    fn check_open(&self, op: impl FnOnce() -> String) -> Result<()> {
        if self.inner.world.finalized.load(Ordering::Acquire) {
            return Err(Error::InvalidArgument {
                rank: self.rank(),
                op: op(),
                detail: "the communicator was finalized; no operation is possible after finalize"
                    .into(),
            });
        }
        Ok(())
    }

    fn lost(&self, op: &str, f: Failure) -> Error {
        match f {
            Failure::JobAborted { by, reason } => Error::Aborted {
                by_rank: self.comm_rank_of(by).unwrap_or(by),
                reason: format!("{op}: {reason}"),
            },
            Failure::Lost { rank, reason }
            | Failure::CollAborted(Abort {
                by: rank, reason, ..
            }) => Error::PeerLost {
                observer: self.rank(),
                rank: self.comm_rank_of(rank).unwrap_or(rank),
                host: self.transport().peer_location(rank),
                op: op.to_string(),
                reason,
            },
        }
    }

    /// Run `fut` bounded by the operation timeout.
    async fn bounded<T>(
        &self,
        op: &(dyn Fn() -> String + Sync),
        waiting_on: &[usize],
        fut: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let limit = self.config().op_timeout();
        match tokio::time::timeout(limit, fut).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                rank: self.rank(),
                op: op(),
                waiting_on: waiting_on.to_vec(),
                after: limit,
                hint: "the peer never made the matching call, or is much slower; if it is \
                       legitimately slow raise Config::set_op_timeout (RANKMESH_OP_TIMEOUT)"
                    .into(),
            }),
        }
    }
}

#[cfg(test)]
mod striping_tests;

#[cfg(test)]
mod tests {
    #[test]
    fn communicator_is_clone_send_sync() {
        fn check<T: Clone + Send + Sync + 'static>() {}
        check::<super::Communicator>();
    }

    /// `Config::set_spin_wait` reaches the QUIC transport's receives.
    #[tokio::test]
    async fn spin_wait_setting_reaches_the_transport() {
        for window in [17, 0].map(std::time::Duration::from_micros) {
            let mut cfg = crate::Config::default();
            cfg.set_spin_wait(window);
            let got = crate::testing::LocalJob::quic(2)
                .config(cfg)
                .run(|comm| async move {
                    comm.barrier().await?;
                    Ok(comm.inner.world.transport.mailbox().spin_wait())
                })
                .await
                .unwrap();
            assert_eq!(got, [window, window]);
        }
    }
    /// What is kept for a communicator goes with its last handle: after
    /// many split/use/drop cycles (distinct tags, collectives, a late
    /// frame's records), the mailbox's maps and the collective ledger hold
    /// what they held before.
    #[tokio::test]
    async fn split_use_drop_cycles_leave_nothing_behind() {
        let got = crate::testing::LocalJob::in_memory(2)
            .run(|comm| async move {
                comm.barrier().await?;
                let world = comm.inner.world.clone();
                let before = (world.transport.mailbox().entries(), world.ledger.comms());
                for i in 0..200u32 {
                    let sub = comm.split(0, comm.rank() as u32).await?;
                    let peer = 1 - sub.rank();
                    let mut got = [0u32; 4];
                    if sub.rank() == 0 {
                        sub.send(&[i; 4], peer, i).await?;
                        sub.recv(&mut got, peer, i).await?;
                    } else {
                        sub.recv(&mut got, peer, i).await?;
                        sub.send(&[i; 4], peer, i).await?;
                    }
                    assert_eq!(got, [i; 4]);
                    let mut v = [1u64; 3];
                    sub.all_reduce(&mut v, crate::ReduceOp::Sum).await?;
                    assert_eq!(v, [2; 3]);
                    sub.barrier().await?;
                }
                comm.barrier().await?;
                let after = (world.transport.mailbox().entries(), world.ledger.comms());
                Ok((before, after))
            })
            .await
            .unwrap();
        for ((entries_before, comms_before), (entries, comms)) in got {
            // The peer may be one operation ahead when a count is taken (its
            // next frame already here): one entry of slack, not one a cycle.
            assert!(
                entries <= entries_before.max(1),
                "mailbox entries: {entries_before} before, {entries} after 200 cycles"
            );
            assert_eq!(comms, comms_before, "communicators in the ledger");
        }
    }
    /// Collectives and messages on one tag leave the matching maps as they
    /// found them (one idle queue for the tag), however many there are.
    #[tokio::test]
    async fn many_collectives_and_messages_on_one_tag_leave_the_maps_flat() {
        let got = crate::testing::LocalJob::in_memory(2)
            .run(|comm| async move {
                let mb = || comm.inner.world.transport.mailbox().entries();
                comm.barrier().await?;
                let before = mb();
                let peer = 1 - comm.rank();
                for i in 0..2000u32 {
                    let mut v = [i];
                    comm.all_reduce(&mut v, crate::ReduceOp::Max).await?;
                    let mut got = [0u32];
                    if comm.rank() == 0 {
                        comm.send(&[i], peer, 5).await?;
                        comm.recv(&mut got, peer, 5).await?;
                    } else {
                        comm.recv(&mut got, peer, 5).await?;
                        comm.send(&[i], peer, 5).await?;
                    }
                }
                comm.barrier().await?;
                Ok((before, mb(), comm.inner.world.ledger.comms()))
            })
            .await
            .unwrap();
        for (before, after, comms) in got {
            // The tag's idle queue, and one entry of slack for a peer that
            // is one operation ahead when a count is taken.
            assert!(after <= before + 2, "mailbox entries {before} -> {after}");
            assert_eq!(comms, 1, "communicators in the ledger");
        }
    }

    /// Messages on distinct tags leave nothing per tag behind, on the
    /// receiving side (queues) or the sending side (message numbers).
    #[tokio::test]
    async fn messages_on_distinct_tags_leave_the_maps_flat() {
        let got = crate::testing::LocalJob::in_memory(2)
            .run(|comm| async move {
                let mb = || comm.inner.world.transport.mailbox().entries();
                let numbers = || comm.inner.p2p_next.lock().map(|m| m.len()).unwrap_or(0);
                comm.barrier().await?;
                let before = (mb(), numbers());
                let peer = 1 - comm.rank();
                for tag in 0..2000u32 {
                    let mut got = [0u32];
                    if comm.rank() == 0 {
                        comm.send(&[tag], peer, tag).await?;
                        comm.recv(&mut got, peer, tag).await?;
                    } else {
                        comm.recv(&mut got, peer, tag).await?;
                        comm.send(&[tag], peer, tag).await?;
                    }
                    assert_eq!(got[0], tag);
                }
                comm.barrier().await?;
                Ok((before, (mb(), numbers())))
            })
            .await
            .unwrap();
        for ((mb0, n0), (mb1, n1)) in got {
            assert!(mb1 <= mb0 + 2, "mailbox entries {mb0} -> {mb1}");
            assert!(n1 <= n0 + 1, "message numbers kept {n0} -> {n1}");
        }
    }
}
