//! The collective operations of [`Communicator`].
//!
//! Each call takes the communicator's next sequence number, so concurrent
//! collectives and point-to-point traffic never mix; picks an algorithm;
//! runs its schedule with the executor; and turns failures into errors that
//! name the ranks. A rank that fails a collective tells every other member
//! (an Abort frame for that sequence number), so nobody waits for it until a
//! timeout: all members return an error naming the cause.

use super::ledger::LateMismatch;
use super::recorder::What;
use super::Communicator;
use crate::coll::exec::{Ctx, Desc, ExecError};
use crate::coll::select::{plan, CostModel};
use crate::coll::{CollKind, Schedule};
use crate::datatype::{DType, Element, ReduceOp};
use crate::transport::{Abort, AbortKind, Failure, Payload};
use crate::wire::{FrameKind, Header};
use crate::{Error, Result};
use bytes::Bytes;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// The working memory of one collective call.
pub(super) enum Work<'a> {
    /// Host memory: sends read `src` when given, else `work`.
    Host {
        src: Option<&'a [u8]>,
        work: &'a mut [u8],
    },
    /// A device buffer.
    Device(&'a dyn crate::gpu::DeviceBuffer),
}

/// Longest explanation an Abort frame carries.
const ABORT_TEXT_MAX: usize = 4096;
/// How long a failing rank spends telling the others.
const ABORT_NOTICE: Duration = Duration::from_secs(2);
/// How long a rank whose collective timed out waits for the rank it was
/// waiting on to explain its own timeout.
const TIMEOUT_GRACE: Duration = Duration::from_secs(1);
/// How long a rank that lost a peer mid-collective waits for that peer's
/// explanation (it may have refused the call just before it left).
const LOST_GRACE: Duration = Duration::from_millis(300);

impl Communicator {
    /// Block until every rank of the communicator has called `barrier`.
    pub async fn barrier(&self) -> Result<()> {
        let seq = self.next_seq();
        let desc = self.desc(CollKind::Barrier, DType::Bytes, None, 0, None);
        let plan = plan::barrier(self.rank(), self.size());
        self.run_coll(seq, desc, &plan, None, &mut []).await
    }

    /// Copy `buf` of rank `root` into `buf` of every rank.
    pub async fn broadcast<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> {
        let seq = self.next_seq();
        let mut desc = self.desc(CollKind::Broadcast, T::DTYPE, None, buf.len(), Some(root));
        self.check_root(seq, &desc, root).await?;
        let plan = self.broadcast_plan(&mut desc, root);
        self.run_coll(seq, desc, &plan, None, bytemuck::cast_slice_mut(buf))
            .await
    }

    /// Reduce `buf` element-wise over all ranks with `op`; every rank gets
    /// the result, bitwise identical on all ranks.
    pub async fn all_reduce<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let seq = self.next_seq();
        let mut desc = self.desc(CollKind::AllReduce, T::DTYPE, Some(op), buf.len(), None);
        let plan = self.allreduce_plan(&mut desc);
        self.run_coll(seq, desc, &plan, None, bytemuck::cast_slice_mut(buf))
            .await
    }

    /// Reduce `buf` element-wise over all ranks with `op` into `buf` of
    /// `root`. Other ranks' buffers are left unchanged.
    pub async fn reduce<T: Element>(&self, buf: &mut [T], op: ReduceOp, root: usize) -> Result<()> {
        let seq = self.next_seq();
        let desc = self.desc(CollKind::Reduce, T::DTYPE, Some(op), buf.len(), Some(root));
        self.check_root(seq, &desc, root).await?;
        let plan = plan::reduce(self.rank(), self.size(), buf.len(), root);
        if self.rank() == root {
            self.run_coll(seq, desc, &plan, None, bytemuck::cast_slice_mut(buf))
                .await
        } else {
            let mut acc = buf.to_vec();
            self.run_coll(seq, desc, &plan, None, bytemuck::cast_slice_mut(&mut acc))
                .await
        }
    }

    /// Gather every rank's `send` into `recv` of every rank, in rank order
    /// (`recv.len() == size * send.len()`).
    pub async fn all_gather<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        let seq = self.next_seq();
        let m = send.len();
        let desc = self.desc(CollKind::AllGather, T::DTYPE, None, m, None);
        self.check_len(
            seq,
            &desc,
            "recv",
            recv.len(),
            self.size() * m,
            "size * send.len()",
        )
        .await?;
        recv[self.rank() * m..(self.rank() + 1) * m].copy_from_slice(send);
        let plan = plan::allgather(self.rank(), self.size(), m);
        self.run_coll(seq, desc, &plan, None, bytemuck::cast_slice_mut(recv))
            .await
    }

    /// Reduce `send` (`size` blocks of `recv.len()` elements) over all ranks
    /// with `op`; rank r receives block r of the result.
    pub async fn reduce_scatter<T: Element>(
        &self,
        send: &[T],
        recv: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        let seq = self.next_seq();
        let m = recv.len();
        let desc = self.desc(CollKind::ReduceScatter, T::DTYPE, Some(op), m, None);
        self.check_len(
            seq,
            &desc,
            "send",
            send.len(),
            self.size() * m,
            "size * recv.len()",
        )
        .await?;
        let mut work = send.to_vec();
        let plan = plan::reduce_scatter(self.rank(), self.size(), m);
        self.run_coll(seq, desc, &plan, None, bytemuck::cast_slice_mut(&mut work))
            .await?;
        recv.copy_from_slice(&work[self.rank() * m..(self.rank() + 1) * m]);
        Ok(())
    }

    /// Gather every rank's `send` into `recv` of `root`, in rank order
    /// (`recv.len() == size * send.len()` on the root; ignored elsewhere).
    pub async fn gather<T: Element>(&self, send: &[T], recv: &mut [T], root: usize) -> Result<()> {
        let seq = self.next_seq();
        let m = send.len();
        let desc = self.desc(CollKind::Gather, T::DTYPE, None, m, Some(root));
        self.check_root(seq, &desc, root).await?;
        let plan = plan::gather(self.rank(), self.size(), m, root);
        if self.rank() == root {
            self.check_len(
                seq,
                &desc,
                "recv",
                recv.len(),
                self.size() * m,
                "size * send.len()",
            )
            .await?;
            recv[root * m..(root + 1) * m].copy_from_slice(send);
            self.run_coll(seq, desc, &plan, None, bytemuck::cast_slice_mut(recv))
                .await
        } else {
            self.run_coll(seq, desc, &plan, Some(bytemuck::cast_slice(send)), &mut [])
                .await
        }
    }

    /// Send block i of `send` on `root` (`size` blocks of `recv.len()`
    /// elements) to rank i's `recv`.
    pub async fn scatter<T: Element>(&self, send: &[T], recv: &mut [T], root: usize) -> Result<()> {
        let seq = self.next_seq();
        let m = recv.len();
        let desc = self.desc(CollKind::Scatter, T::DTYPE, None, m, Some(root));
        self.check_root(seq, &desc, root).await?;
        let plan = plan::scatter(self.rank(), self.size(), m, root);
        if self.rank() == root {
            self.check_len(
                seq,
                &desc,
                "send",
                send.len(),
                self.size() * m,
                "size * recv.len()",
            )
            .await?;
            recv.copy_from_slice(&send[root * m..(root + 1) * m]);
            self.run_coll(seq, desc, &plan, Some(bytemuck::cast_slice(send)), &mut [])
                .await
        } else {
            self.run_coll(seq, desc, &plan, None, bytemuck::cast_slice_mut(recv))
                .await
        }
    }

    /// Block j of `send` goes to rank j, and arrives as block `rank` of its
    /// `recv` (`send.len() == recv.len()`, a multiple of `size`).
    pub async fn all_to_all<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        let seq = self.next_seq();
        let p = self.size();
        let m = send.len() / p;
        let desc = self.desc(CollKind::AllToAll, T::DTYPE, None, m, None);
        self.check_len(seq, &desc, "send", send.len(), p * m, "a multiple of size")
            .await?;
        self.check_len(seq, &desc, "recv", recv.len(), send.len(), "send.len()")
            .await?;
        let r = self.rank();
        recv[r * m..(r + 1) * m].copy_from_slice(&send[r * m..(r + 1) * m]);
        let plan = plan::all_to_all(r, p, m);
        self.run_coll(
            seq,
            desc,
            &plan,
            Some(bytemuck::cast_slice(send)),
            bytemuck::cast_slice_mut(recv),
        )
        .await
    }

    /// Split into sub-communicators (MPI_Comm_split): ranks with the same
    /// `color` form one, ordered by `key` (ties by rank in this
    /// communicator). It reuses this communicator's connections.
    pub async fn split(&self, color: u32, key: u32) -> Result<super::Communicator> {
        let seq = self.next_seq();
        let p = self.size();
        let desc = self.desc(CollKind::Split, DType::U32, None, 2, None);
        let mut all = vec![0u32; 2 * p];
        all[2 * self.rank()] = color;
        all[2 * self.rank() + 1] = key;
        let plan = plan::allgather(self.rank(), p, 2);
        self.run_coll(seq, desc, &plan, None, bytemuck::cast_slice_mut(&mut all))
            .await?;
        let mut mine: Vec<(u32, usize)> = (0..p)
            .filter(|&i| all[2 * i] == color)
            .map(|i| (all[2 * i + 1], i))
            .collect();
        mine.sort_unstable();
        let members: Vec<usize> = mine.iter().map(|&(_, i)| self.world_rank(i)).collect();
        let rank = mine
            .iter()
            .position(|&(_, i)| i == self.rank())
            .unwrap_or(0);
        let id = mix(mix(self.inner.comm_id ^ 0x5bd1_e995) ^ seq) ^ u64::from(color);
        Ok(self.derive(mix(id).max(1), rank, members))
    }

    /// The broadcast schedule for `desc` (whose algorithm it sets).
    pub(super) fn broadcast_plan(&self, desc: &mut Desc, root: usize) -> Schedule {
        let (a, schedule) = plan::broadcast(
            &self.model(),
            self.config().algorithm(),
            (self.rank(), self.size()),
            desc.count as usize,
            desc.dtype.size(),
            root,
        );
        desc.algo = a.name();
        schedule
    }

    /// The allreduce schedule for `desc` (whose algorithm it sets).
    pub(super) fn allreduce_plan(&self, desc: &mut Desc) -> Schedule {
        let (a, schedule) = plan::allreduce(
            &self.model(),
            self.config().algorithm(),
            (self.rank(), self.size()),
            desc.count as usize,
            desc.dtype.size(),
        );
        desc.algo = a.name();
        schedule
    }

    pub(super) fn next_seq(&self) -> u64 {
        self.inner.coll_seq.fetch_add(1, Ordering::Relaxed)
    }

    pub(super) fn model(&self) -> CostModel {
        CostModel::default()
    }

    pub(super) fn desc(
        &self,
        kind: CollKind,
        dtype: DType,
        op: Option<ReduceOp>,
        count: usize,
        root: Option<usize>,
    ) -> Desc {
        Desc {
            kind,
            dtype,
            op,
            count: count as u64,
            root,
            algo: match kind {
                CollKind::Barrier => "dissemination",
                CollKind::Broadcast | CollKind::Reduce => "binomial",
                CollKind::AllReduce => "recursive-doubling",
                CollKind::AllGather | CollKind::ReduceScatter | CollKind::Split => "ring",
                CollKind::Gather | CollKind::Scatter | CollKind::AllToAll => "linear",
            },
        }
    }

    pub(super) fn op_name(&self, seq: u64, desc: &Desc) -> String {
        format!("{} #{seq}", desc.kind.name())
    }

    /// Refuse a bad root. Like every refusal after the sequence number was
    /// taken, it tells the other members, who would otherwise wait for this
    /// rank's part until their timeout.
    pub(super) async fn check_root(&self, seq: u64, desc: &Desc, root: usize) -> Result<()> {
        let res = self.check_rank(|| self.op_name(seq, desc), "root", root);
        self.refused(seq, res).await
    }

    pub(super) async fn refused<T>(&self, seq: u64, res: Result<T>) -> Result<T> {
        if let Err(e) = &res {
            self.abort_collective(seq, AbortKind::Failed, &e.to_string())
                .await;
        }
        res
    }

    pub(super) async fn check_len(
        &self,
        seq: u64,
        desc: &Desc,
        what: &str,
        got: usize,
        want: usize,
        rule: &str,
    ) -> Result<()> {
        if got == want {
            return Ok(());
        }
        let e = Err(Error::InvalidArgument {
            rank: self.rank(),
            op: self.op_name(seq, desc),
            detail: format!("{what} holds {got} elements but must hold {rule} = {want}"),
        });
        self.refused(seq, e).await
    }

    /// Run one collective's schedule, bounded by the operation timeout; on
    /// failure tell the other members and return an error naming the cause.
    async fn run_coll(
        &self,
        seq: u64,
        desc: Desc,
        plan: &Schedule,
        src: Option<&[u8]>,
        work: &mut [u8],
    ) -> Result<()> {
        self.run_coll_on(seq, desc, plan, Work::Host { src, work })
            .await
    }

    /// [`Self::run_coll`] on host memory or on a device buffer, recorded by
    /// the flight recorder (which is dumped to a file on a timeout).
    pub(super) async fn run_coll_on(
        &self,
        seq: u64,
        desc: Desc,
        plan: &Schedule,
        work: Work<'_>,
    ) -> Result<()> {
        let world = &self.inner.world;
        let guard = world.recorder.start(
            self.inner.comm_id,
            seq,
            desc.kind.name(),
            What::Coll(desc.wire()),
            desc.count * desc.dtype.size() as u64,
            desc.algo,
            self.size(),
        );
        let span = tracing::debug_span!(
            "collective",
            rank = self.rank(),
            comm = self.inner.comm_id,
            seq,
            op = desc.kind.name(),
            bytes = desc.count * desc.dtype.size() as u64,
            algorithm = desc.algo,
            peers = self.size(),
        );
        let run = self.run_coll_inner(seq, desc, plan, work);
        let res = if span.is_disabled() {
            run.await
        } else {
            tracing::Instrument::instrument(run, span).await
        };
        guard.finish(&res);
        if let Err(e @ Error::Timeout { .. }) = &res {
            self.dump_flight(&format!("timeout: {e}"), &self.waiting_report());
        }
        res
    }

    /// Write the flight recorder (and trace) to its file; log where.
    pub(crate) fn dump_flight(&self, why: &str, extra: &str) {
        match self.inner.world.recorder.dump(why, extra) {
            Ok(path) => tracing::error!(
                rank = self.rank(),
                "flight recorder written to {}",
                path.display()
            ),
            Err(e) => tracing::warn!(rank = self.rank(), "cannot write the flight recorder: {e}"),
        }
    }

    /// The last collective this rank has seen a message of from each
    /// member (a peer far behind is the likely culprit of a hang).
    pub(crate) fn waiting_report(&self) -> String {
        let seen = self
            .inner
            .world
            .ledger
            .last_seen(self.inner.comm_id, self.inner.epoch);
        let mut s = format!(
            "communicator {:#x}: this rank (rank {}) has started {} collectives; last \
             collective each member sent a message for:\n",
            self.inner.comm_id,
            self.rank(),
            self.inner.coll_seq.load(Ordering::Relaxed)
        );
        for (r, &w) in self.inner.members.iter().enumerate() {
            if r == self.rank() {
                continue;
            }
            match seen.iter().find(|(src, _)| *src as usize == w) {
                Some((_, seq)) => s.push_str(&format!("  rank {r}: #{seq}\n")),
                None => s.push_str(&format!("  rank {r}: none yet\n")),
            }
        }
        s
    }

    async fn run_coll_inner(
        &self,
        seq: u64,
        desc: Desc,
        plan: &Schedule,
        work: Work<'_>,
    ) -> Result<()> {
        // The operation's name is only needed for errors and warnings.
        let op_name = || self.op_name(seq, &desc);
        self.check_open(op_name)?;
        let mailbox = self.transport().mailbox();
        let (comm_id, epoch) = (self.inner.comm_id, self.inner.epoch);
        let ledger = &self.inner.world.ledger;
        if let Some(late) = ledger.begin_coll(comm_id, epoch) {
            let e = self.late_mismatch(&op_name(), late);
            self.abort_collective(seq, AbortKind::Mismatch, &e.to_string())
                .await;
            return Err(e);
        }
        let waiting = AtomicUsize::new(usize::MAX);
        let ctx = Ctx {
            transport: self.transport(),
            comm_id: self.inner.comm_id,
            epoch: self.inner.epoch,
            seq,
            members: &self.inner.members,
            rank: self.rank(),
            desc,
            waiting: &waiting,
        };
        let limit = self.config().op_timeout();
        let run = async {
            match work {
                Work::Host { src, work } => ctx.run(plan, src, work).await,
                Work::Device(buf) => ctx.run_device(plan, buf).await,
            }
        };
        let res = self.warn_while(run, limit, &op_name, &waiting).await;
        let me = self.rank();
        let failure = match res {
            Some(Ok(())) => {
                // Recorded first: a frame of the call arriving from now on
                // is checked on arrival, one that came before is in `stray`.
                ledger.finished(comm_id, epoch, seq, desc.wire());
                let stray = mailbox.take_coll(comm_id, epoch, seq);
                let Some(late) = ledger.check_stray(seq, desc.wire(), &stray) else {
                    return Ok(());
                };
                let e = self.late_mismatch(&op_name(), late);
                self.send_abort(seq, AbortKind::Mismatch, &e.to_string())
                    .await;
                return Err(e);
            }
            Some(Err(e)) => Some(self.root_cause(seq, e)),
            None => None,
        };
        let op = op_name();
        let (err, notice) = match failure {
            None => {
                let w = waiting.load(Ordering::Relaxed);
                let waiting_on = if w == usize::MAX { Vec::new() } else { vec![w] };
                let e = Error::Timeout {
                    rank: me,
                    op: op.clone(),
                    waiting_on,
                    after: limit,
                    hint: format!(
                        "a rank did not make the matching call (or is stuck); check that \
                         every rank calls the same collectives in the same order, or raise \
                         Config::set_op_timeout (RANKMESH_OP_TIMEOUT); this rank's recent \
                         operations: {}",
                        self.inner.world.recorder.flight_path().display()
                    ),
                };
                // Tell the others first, then give the rank this one waits
                // on a moment to explain itself: in a chain of waiting
                // ranks, every one times out at about the same time, and
                // only the last one knows the culprit.
                self.send_abort(seq, AbortKind::Failed, &e.to_string())
                    .await;
                let e = match self.abort_from(seq, w, TIMEOUT_GRACE).await {
                    Some(a) => Error::Aborted {
                        by_rank: w,
                        reason: format!("{op}: {}", a.reason),
                    },
                    None => e,
                };
                self.record_abort(seq, AbortKind::Failed, &e.to_string());
                (e, None)
            }
            Some(ExecError::Mismatch { detail, .. }) => {
                let n = Some((AbortKind::Mismatch, detail.clone()));
                (
                    Error::Mismatch {
                        rank: me,
                        op: op.clone(),
                        detail,
                    },
                    n,
                )
            }
            Some(ExecError::Device { detail }) => {
                let e = Error::Gpu {
                    detail: format!("rank {me}: {op}: {detail}"),
                };
                let n = Some((AbortKind::Failed, e.to_string()));
                (e, n)
            }
            Some(ExecError::Broken { peer, detail }) => {
                let e = Error::Transport {
                    rank: Some(me),
                    detail: format!("{op}: the message from rank {peer} broke off: {detail}"),
                };
                let n = Some((AbortKind::Failed, e.to_string()));
                (e, n)
            }
            Some(ExecError::Peer {
                failure: failure @ Failure::JobAborted { .. },
            }) => {
                // The whole job was aborted: every rank heard it already.
                (self.lost(&op, failure), None)
            }
            Some(ExecError::Peer {
                failure: Failure::CollAborted(a),
            }) => {
                let by = self.comm_rank_of(a.by).unwrap_or(a.by);
                let why = a.reason;
                // Pass the notice on: a peer waiting on this rank must not
                // mistake its exit for the cause.
                let (e, text) = if a.kind == AbortKind::Mismatch {
                    let detail = format!("reported by rank {by}: {why}");
                    let e = Error::Mismatch {
                        rank: me,
                        op: op.clone(),
                        detail: detail.clone(),
                    };
                    (e, detail)
                } else {
                    // If this rank was itself still waiting on another one,
                    // say so: the rank that gave up first may only have been
                    // waiting on this one, and the culprit is further down.
                    let w = waiting.load(Ordering::Relaxed);
                    let also = if w != usize::MAX && w != by {
                        format!("; rank {me} was itself still waiting on rank {w}")
                    } else {
                        String::new()
                    };
                    let e = Error::Aborted {
                        by_rank: by,
                        reason: format!("{op}: {why}{also}"),
                    };
                    let t = e.to_string();
                    (e, t)
                };
                (e, Some((a.kind, text)))
            }
            Some(ExecError::Peer { failure, .. }) => {
                // A rank that refused this call tells the others and then
                // may leave at once: its notice can arrive after its
                // departure was seen. The notice names the cause.
                let explained = match self.comm_rank_of(failure.rank()) {
                    Some(by) => self.abort_from(seq, by, LOST_GRACE).await.map(|a| (by, a)),
                    None => None,
                };
                let e = match explained {
                    Some((by, a)) if a.kind == AbortKind::Mismatch => Error::Mismatch {
                        rank: me,
                        op: op.clone(),
                        detail: format!("reported by rank {by}: {}", a.reason),
                    },
                    Some((by, a)) => Error::Aborted {
                        by_rank: by,
                        reason: format!("{op}: {}", a.reason),
                    },
                    None => self.lost(&op, failure),
                };
                let n = Some((AbortKind::Failed, e.to_string()));
                (e, n)
            }
        };
        if let Some((kind, text)) = notice {
            self.abort_collective(seq, kind, &text).await;
        }
        Err(err)
    }

    /// A peer that aborted this collective explains every other failure of
    /// it (a send to a rank that left after aborting fails too, but the
    /// abort names the cause).
    fn root_cause(&self, seq: u64, e: ExecError) -> ExecError {
        let (comm_id, epoch) = (self.inner.comm_id, self.inner.epoch);
        match self.inner.world.ledger.coll_abort(comm_id, epoch, seq) {
            Some(a) if !matches!(e, ExecError::Mismatch { .. }) => ExecError::Peer {
                failure: Failure::CollAborted(a),
            },
            _ => e,
        }
    }

    fn late_mismatch(&self, op: &str, late: LateMismatch) -> Error {
        let src = self
            .comm_rank_of(late.src as usize)
            .unwrap_or(late.src as usize);
        Error::Mismatch {
            rank: self.rank(),
            op: op.to_string(),
            detail: format!(
                "collective #{} did not match: rank {src} called {}, rank {} called {}",
                late.seq,
                late.theirs,
                self.rank(),
                late.mine
            ),
        }
    }

    /// Run `run` for at most `limit`, logging a warning naming the rank it
    /// waits on every [`Config::hang_warning`] meanwhile; `None` when the
    /// limit passed. One timer serves both.
    async fn warn_while<T>(
        &self,
        run: impl std::future::Future<Output = T>,
        limit: Duration,
        op: &(dyn Fn() -> String + Sync),
        waiting: &AtomicUsize,
    ) -> Option<T> {
        let every = self.config().hang_warning().max(Duration::from_millis(10));
        let started = tokio::time::Instant::now();
        let deadline = started + limit;
        let timer = tokio::time::sleep_until((started + every).min(deadline));
        tokio::pin!(run, timer);
        loop {
            tokio::select! {
                biased;
                v = &mut run => return Some(v),
                () = &mut timer => {
                    let now = tokio::time::Instant::now();
                    if now >= deadline {
                        return None;
                    }
                    let w = waiting.load(Ordering::Relaxed);
                    let on = if w == usize::MAX {
                        "its peers".to_string()
                    } else {
                        format!(
                            "rank {w} ({})",
                            self.transport().peer_location(self.world_rank(w))
                        )
                    };
                    tracing::warn!(
                        rank = self.rank(),
                        "{} has waited {:.0?} on {on}; it fails after {:?} \
                         (Config::set_op_timeout)\n{}",
                        op(),
                        started.elapsed(),
                        self.config().op_timeout(),
                        self.waiting_report()
                    );
                    timer.as_mut().reset((now + every).min(deadline));
                }
            }
        }
    }

    /// Record that this rank abandoned collective `seq` and tell every other
    /// member, so that none of them waits for it.
    async fn abort_collective(&self, seq: u64, kind: AbortKind, text: &str) {
        self.record_abort(seq, kind, text);
        self.send_abort(seq, kind, text).await;
    }

    fn record_abort(&self, seq: u64, kind: AbortKind, text: &str) {
        let abort = Abort {
            by: self.world_rank(self.rank()),
            kind,
            reason: text.to_string(),
        };
        let (comm_id, epoch) = (self.inner.comm_id, self.inner.epoch);
        if self
            .inner
            .world
            .ledger
            .abort(comm_id, epoch, seq, abort.clone())
        {
            let failure = Failure::CollAborted(abort);
            self.transport()
                .mailbox()
                .fail_coll(comm_id, epoch, seq, &failure);
        }
    }

    async fn send_abort(&self, seq: u64, kind: AbortKind, text: &str) {
        // Far below the eager limit, so that receivers read it in one piece.
        let mut cut = text.len().min(ABORT_TEXT_MAX);
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        let text = &text[..cut];
        let t = self.transport();
        let me = self.world_rank(self.rank());
        let mut payload = Vec::with_capacity(text.len() + 1);
        payload.push(kind.to_wire());
        payload.extend_from_slice(text.as_bytes());
        let payload = Bytes::from(payload);
        let mut h = Header::new(
            FrameKind::Abort,
            me as u32,
            self.inner.comm_id,
            self.inner.epoch,
        );
        h.seq = seq;
        h.len = payload.len() as u64;
        let sends: Vec<_> = self
            .inner
            .members
            .iter()
            .filter(|&&w| w != me)
            .map(|&w| t.send(w, h, Payload::Owned(vec![payload.clone()])))
            .collect();
        let all = async {
            for s in sends {
                let _ = s.await;
            }
        };
        let _ = tokio::time::timeout(ABORT_NOTICE, all).await;
    }

    /// Wait up to `grace` for communicator rank `peer` to abort collective
    /// `seq`; its abort if it did.
    async fn abort_from(&self, seq: u64, peer: usize, grace: Duration) -> Option<Abort> {
        let world = *self.inner.members.get(peer)?;
        let ledger = &self.inner.world.ledger;
        let until = tokio::time::Instant::now() + grace;
        loop {
            match ledger.coll_abort(self.inner.comm_id, self.inner.epoch, seq) {
                Some(a) if a.by == world => return Some(a),
                Some(_) => return None,
                None if tokio::time::Instant::now() >= until => return None,
                None => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }
}

/// SplitMix64 finalizer: a well-mixed 64-bit hash step.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
