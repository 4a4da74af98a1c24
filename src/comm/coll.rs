//! The collective operations of [`Communicator`].
//!
//! Each call takes the communicator's next sequence number, so concurrent
//! collectives and point-to-point traffic never mix; picks an algorithm;
//! runs its schedule with the executor, bounded by the operation timeout
//! and warning while it waits. A failure becomes an error naming the ranks
//! in `abort.rs`, which also tells every other member (an Abort frame for
//! that sequence number), so nobody waits for it until a timeout.

use super::call::Side;
use super::recorder::What;
use super::Communicator;
use crate::coll::exec::{Ctx, Desc};
use crate::coll::select::{plan, CostModel};
use crate::coll::{CollKind, Schedule};
use crate::datatype::{DType, Element, ReduceOp};
use crate::transport::AbortKind;
use crate::{Error, Result};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Host memory `work`, read and written in place.
fn host(work: &mut [u8]) -> Work<'_> {
    Work::Host { src: None, work }
}

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
        let call = self.broadcast_call(T::DTYPE, buf.len(), root).await?;
        self.run_call(call, host(bytemuck::cast_slice_mut(buf)))
            .await
    }

    /// Reduce `buf` element-wise over all ranks with `op`; every rank gets
    /// the result, bitwise identical on all ranks.
    pub async fn all_reduce<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let call = self.all_reduce_call(T::DTYPE, op, buf.len());
        self.run_call(call, host(bytemuck::cast_slice_mut(buf)))
            .await
    }

    /// Reduce `buf` element-wise over all ranks with `op` into `buf` of
    /// `root`. Other ranks' buffers are left unchanged.
    pub async fn reduce<T: Element>(&self, buf: &mut [T], op: ReduceOp, root: usize) -> Result<()> {
        let call = self.reduce_call(T::DTYPE, op, buf.len(), root).await?;
        if self.rank() == root {
            self.run_call(call, host(bytemuck::cast_slice_mut(buf)))
                .await
        } else {
            let mut acc = buf.to_vec();
            self.run_call(call, host(bytemuck::cast_slice_mut(&mut acc)))
                .await
        }
    }

    /// Gather every rank's `send` into `recv` of every rank, in rank order
    /// (`recv.len() == size * send.len()`).
    pub async fn all_gather<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        let sides = (
            Side::new(T::DTYPE, send.len()),
            Side::new(T::DTYPE, recv.len()),
        );
        let call = self.all_gather_call(sides.0, sides.1).await?;
        let (r, m) = (self.rank(), send.len());
        recv[r * m..(r + 1) * m].copy_from_slice(send);
        self.run_call(call, host(bytemuck::cast_slice_mut(recv)))
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
        let sides = (
            Side::new(T::DTYPE, send.len()),
            Side::new(T::DTYPE, recv.len()),
        );
        let call = self.reduce_scatter_call(sides.0, sides.1, op).await?;
        let mut work = send.to_vec();
        self.run_call(call, host(bytemuck::cast_slice_mut(&mut work)))
            .await?;
        let (r, m) = (self.rank(), recv.len());
        recv.copy_from_slice(&work[r * m..(r + 1) * m]);
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
        Err(self.failed(seq, op_name(), failure, &waiting, limit).await)
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
}

/// SplitMix64 finalizer: a well-mixed 64-bit hash step.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
