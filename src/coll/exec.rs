//! Runs a [`Schedule`] over a [`Transport`].
//!
//! Per phase: the sends are snapshotted into `Bytes` (the one copy a send
//! needs, since the transport owns what it sends) and issued concurrently;
//! the receives are taken in order and applied chunk by chunk as the stream
//! delivers them, reducing straight from the received `Bytes` into the
//! working buffer, so reducing one chunk overlaps the arrival of the next.
//!
//! Every received frame's descriptor (collective, element type, op, element
//! count, root) is compared with this rank's; a difference is a
//! [`ExecError::Mismatch`] naming both sides.

use super::{CollKind, Phase, Recv, Schedule, Xfer};
use crate::datatype::{DType, ReduceOp};
use crate::reduce::reduce_bytes;
use crate::transport::{Broken, CollKey, Failure, Incoming, Payload, Transport};
use crate::wire::{CollDesc, FrameKind, Header};
use bytes::Bytes;
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};

/// What every rank must agree on for one collective call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Desc {
    pub kind: CollKind,
    pub dtype: DType,
    pub op: Option<ReduceOp>,
    /// Element count (of the whole buffer, or per rank for gather-like calls).
    pub count: u64,
    pub root: Option<usize>,
    /// The algorithm (for reports and traces; not part of the match).
    pub algo: &'static str,
}

impl Desc {
    /// The frame descriptor of this call.
    pub(crate) fn wire(&self) -> CollDesc {
        CollDesc {
            coll: self.kind as u8,
            dtype: self.dtype,
            op: self.op_u8(),
            total: self.count,
            root: self.root_u32(),
        }
    }

    fn op_u8(&self) -> u8 {
        self.op.map_or(0, |o| o.to_u8())
    }

    fn root_u32(&self) -> u32 {
        self.root.map_or(u32::MAX, |r| r as u32)
    }

    /// This rank's call, in words.
    pub(crate) fn mine(&self) -> String {
        self.wire().to_string()
    }
}

/// Why a schedule did not complete.
#[derive(Debug)]
pub(crate) enum ExecError {
    /// A peer (world rank `failure.rank()`) is gone, or aborted this collective.
    Peer { failure: Failure },
    /// A peer made a different call.
    Mismatch { detail: String },
    /// A message from `peer` broke off.
    Broken { peer: usize, detail: String },
    /// This rank's device failed.
    Device { detail: String },
}

/// One collective call on one rank.
pub(crate) struct Ctx<'a> {
    pub transport: &'a dyn Transport,
    pub comm_id: u64,
    pub epoch: u32,
    pub seq: u64,
    /// World rank of each communicator rank.
    pub members: &'a [usize],
    pub rank: usize,
    pub desc: Desc,
    /// The communicator rank this rank is waiting on (for timeout errors).
    pub waiting: &'a AtomicUsize,
}

impl Ctx<'_> {
    pub(super) fn header(&self, sub: u64, len: usize) -> Header {
        let mut h = Header::new(
            FrameKind::Coll,
            self.members[self.rank] as u32,
            self.comm_id,
            self.epoch,
        );
        h.dtype = self.desc.dtype;
        h.op = self.desc.op_u8();
        h.coll = self.desc.kind as u8;
        h.seq = self.seq;
        h.sub = sub;
        h.len = len as u64;
        h.total = self.desc.count;
        h.root = self.desc.root_u32();
        h
    }

    pub(super) fn check(
        &self,
        peer: usize,
        h: &Header,
        want_bytes: usize,
    ) -> Result<(), ExecError> {
        let d = &self.desc;
        if CollDesc::of(h) != d.wire() {
            return Err(ExecError::Mismatch {
                detail: format!(
                    "rank {peer} called {}, rank {} called {}",
                    CollDesc::of(h),
                    self.rank,
                    d.mine()
                ),
            });
        }
        if h.len != want_bytes as u64 {
            return Err(ExecError::Mismatch {
                detail: format!(
                    "rank {peer} sent {} bytes where rank {} expects {want_bytes} ({})",
                    h.len,
                    self.rank,
                    d.mine()
                ),
            });
        }
        Ok(())
    }

    /// Run `sched`. Sends read from `src` when given (all_to_all, gather),
    /// else from `work`; receives write into `work`.
    pub(crate) async fn run(
        &self,
        sched: &Schedule,
        src: Option<&[u8]>,
        work: &mut [u8],
    ) -> Result<(), ExecError> {
        for ph in &sched.phases {
            self.step(ph, self.phase(ph, src, work)).await?;
        }
        Ok(())
    }

    /// Run one phase of a schedule (`fut`) in its tracing span.
    pub(super) async fn step(
        &self,
        ph: &Phase,
        fut: impl Future<Output = Result<(), ExecError>>,
    ) -> Result<(), ExecError> {
        let span = tracing::trace_span!(
            "step",
            sub = ph.sub,
            sends = ph.sends.len(),
            recvs = ph.recvs.len()
        );
        if span.is_disabled() {
            fut.await
        } else {
            tracing::Instrument::instrument(fut, span).await
        }
    }

    /// One phase. Sends borrow the data they send whenever nothing in the
    /// phase writes it (the transport then copies it piece by piece while
    /// sending); only a phase that receives into what it sends (recursive
    /// doubling) snapshots its sends first.
    async fn phase(
        &self,
        ph: &Phase,
        src: Option<&[u8]>,
        work: &mut [u8],
    ) -> Result<(), ExecError> {
        let esz = self.desc.dtype.size();
        let bytes = |r: &Range<usize>| r.start * esz..r.end * esz;
        if let Some(src) = src {
            let sends = self.sends(ph, |x| Payload::Borrowed(&src[bytes(&x.range)]));
            return both(join_all(sends), self.recvs(ph, work)).await;
        }
        if ph.recvs.is_empty() {
            let work: &[u8] = work;
            return join_all(self.sends(ph, |x| Payload::Borrowed(&work[bytes(&x.range)]))).await;
        }
        if let ([sx], [rx]) = (ph.sends.as_slice(), ph.recvs.as_slice()) {
            let (sr, rr) = (bytes(&sx.range), bytes(&rx.range));
            if sr.end <= rr.start || rr.end <= sr.start {
                // Disjoint: split the buffer between the send and the receive.
                let at = if sr.end <= rr.start {
                    rr.start
                } else {
                    sr.start
                };
                let (lo, hi) = work.split_at_mut(at);
                let (out, data): (&mut [u8], &[u8]) = if sr.end <= rr.start {
                    (&mut hi[..rr.len()], &lo[sr])
                } else {
                    (&mut lo[rr], &hi[..sr.len()])
                };
                let send = self.sends(ph, |_| Payload::Borrowed(data));
                return both(join_all(send), self.recv_one(ph.sub, rx.peer, ph.mode, out)).await;
            }
        }
        let snapshot: Vec<Bytes> = ph
            .sends
            .iter()
            .map(|x| Bytes::copy_from_slice(&work[bytes(&x.range)]))
            .collect();
        let mut it = snapshot.into_iter();
        let sends = self.sends(ph, |_| {
            Payload::Owned(it.next().filter(|b| !b.is_empty()).into_iter().collect())
        });
        both(join_all(sends), self.recvs(ph, work)).await
    }

    /// The send futures of a phase, payloads from `data`.
    fn sends<'a>(
        &'a self,
        ph: &Phase,
        mut data: impl FnMut(&Xfer) -> Payload<'a>,
    ) -> Vec<Option<SendFut<'a>>> {
        ph.sends
            .iter()
            .map(|x| {
                let payload = data(x);
                let h = self.header(ph.sub, payload.len());
                let fut = self.transport.send(self.members[x.peer], h, payload, None);
                let f: SendFut<'a> =
                    Box::pin(
                        async move { fut.await.map_err(|failure| ExecError::Peer { failure }) },
                    );
                Some(f)
            })
            .collect()
    }

    /// The receives of a phase, one after the other.
    async fn recvs(&self, ph: &Phase, work: &mut [u8]) -> Result<(), ExecError> {
        let esz = self.desc.dtype.size();
        for x in &ph.recvs {
            let range = x.range.start * esz..x.range.end * esz;
            self.recv_one(ph.sub, x.peer, ph.mode, &mut work[range])
                .await?;
        }
        Ok(())
    }

    /// The message of phase `sub` from communicator rank `peer`, checked
    /// against this rank's call and expected to carry `want_bytes`.
    pub(super) async fn message(
        &self,
        sub: u64,
        peer: usize,
        want_bytes: usize,
    ) -> Result<Incoming, ExecError> {
        self.waiting.store(peer, Ordering::Relaxed);
        let key = CollKey {
            src: self.members[peer] as u32,
            comm_id: self.comm_id,
            epoch: self.epoch,
            seq: self.seq,
            sub,
        };
        let m = self
            .transport
            .mailbox()
            .recv_coll(key)
            .await
            .map_err(|failure| ExecError::Peer { failure })?;
        self.check(peer, m.header(), want_bytes)?;
        Ok(m)
    }

    async fn recv_one(
        &self,
        sub: u64,
        peer: usize,
        mode: Recv,
        out: &mut [u8],
    ) -> Result<(), ExecError> {
        let mut m = self.message(sub, peer, out.len()).await?;
        let broken = |b: Broken| ExecError::Broken { peer, detail: b.0 };
        let (dtype, op) = (self.desc.dtype, self.desc.op);
        let esz = dtype.size();
        let mut at = 0;
        // Bytes of an element split across two chunks.
        let mut carry = [0u8; 8];
        let mut held = 0;
        while let Some(chunk) = m.next_chunk().await.map_err(broken)? {
            let mut c = &chunk[..];
            let Some(op) = op.filter(|_| mode == Recv::Reduce) else {
                out[at..at + c.len()].copy_from_slice(c);
                at += c.len();
                continue;
            };
            let reduce = |dst: &mut [u8], s: &[u8]| {
                reduce_bytes(dtype, op, dst, s).map_err(|e| broken(Broken(e.to_string())))
            };
            if held > 0 {
                let take = (esz - held).min(c.len());
                carry[held..held + take].copy_from_slice(&c[..take]);
                held += take;
                c = &c[take..];
                if held == esz {
                    reduce(&mut out[at..at + esz], &carry[..esz])?;
                    at += esz;
                    held = 0;
                }
            }
            let whole = c.len() / esz * esz;
            reduce(&mut out[at..at + whole], &c[..whole])?;
            at += whole;
            let rest = &c[whole..];
            carry[..rest.len()].copy_from_slice(rest);
            held += rest.len();
        }
        if at != out.len() || held != 0 {
            return Err(broken(Broken(format!(
                "message ended after {} of {} bytes",
                at + held,
                out.len()
            ))));
        }
        Ok(())
    }
}

/// Run sends and receives together until both finish.
pub(super) async fn both(
    sends: impl Future<Output = Result<(), ExecError>>,
    recvs: impl Future<Output = Result<(), ExecError>>,
) -> Result<(), ExecError> {
    // Both halves run to their end: a receive error wins (it usually
    // explains why a send failed too), and a send that completes delivers
    // this rank's part, so peers see the same call fail the same way.
    let (a, b) = tokio::join!(sends, recvs);
    b.and(a)
}

pub(super) type SendFut<'a> = Pin<Box<dyn Future<Output = Result<(), ExecError>> + Send + 'a>>;

/// Drive all sends concurrently; the first error wins (the others are
/// dropped, which resets their streams).
pub(super) async fn join_all(futs: Vec<Option<SendFut<'_>>>) -> Result<(), ExecError> {
    crate::boxfut::try_join_all(futs).await
}
