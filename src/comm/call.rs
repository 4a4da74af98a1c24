//! The checked start of the collectives that exist on host memory and on
//! device buffers.
//!
//! A host call and a device call with the same element type and length
//! must agree on the sequence number, the descriptor peers compare with
//! theirs, and the schedule, so that ranks may mix them in one collective.
//! Both kinds are therefore set up here, by one function per collective;
//! `coll.rs` and `device.rs` only move their own kind of memory.

use super::coll::Work;
use super::Communicator;
use crate::coll::exec::Desc;
use crate::coll::select::plan;
use crate::coll::{CollKind, Schedule};
use crate::datatype::{DType, ReduceOp};
use crate::{Error, Result};

/// A collective call whose arguments have been checked (a refused call has
/// already told the other members).
pub(super) struct Call {
    pub(super) seq: u64,
    pub(super) desc: Desc,
    pub(super) plan: Schedule,
}

/// One side of a two-buffer collective: element type and length.
#[derive(Clone, Copy)]
pub(super) struct Side {
    pub(super) dtype: DType,
    pub(super) len: usize,
}

impl Side {
    pub(super) fn new(dtype: DType, len: usize) -> Side {
        Side { dtype, len }
    }
}

impl Communicator {
    /// An allreduce of `n` elements.
    pub(super) fn all_reduce_call(&self, dtype: DType, op: ReduceOp, n: usize) -> Call {
        let seq = self.next_seq();
        let mut desc = self.desc(CollKind::AllReduce, dtype, Some(op), n, None);
        let (a, plan) = plan::allreduce(
            &self.model(),
            self.config().algorithm(),
            (self.rank(), self.size()),
            n,
            dtype.size(),
        );
        desc.algo = a.name();
        Call { seq, desc, plan }
    }

    /// A broadcast of `n` elements from `root`.
    pub(super) async fn broadcast_call(&self, dtype: DType, n: usize, root: usize) -> Result<Call> {
        let seq = self.next_seq();
        let mut desc = self.desc(CollKind::Broadcast, dtype, None, n, Some(root));
        self.check_root(seq, &desc, root).await?;
        let (a, plan) = plan::broadcast(
            &self.model(),
            self.config().algorithm(),
            (self.rank(), self.size()),
            n,
            dtype.size(),
            root,
        );
        desc.algo = a.name();
        Ok(Call { seq, desc, plan })
    }

    /// A reduction of `n` elements onto `root`.
    pub(super) async fn reduce_call(
        &self,
        dtype: DType,
        op: ReduceOp,
        n: usize,
        root: usize,
    ) -> Result<Call> {
        let seq = self.next_seq();
        let desc = self.desc(CollKind::Reduce, dtype, Some(op), n, Some(root));
        self.check_root(seq, &desc, root).await?;
        let plan = plan::reduce(self.rank(), self.size(), n, root);
        Ok(Call { seq, desc, plan })
    }

    /// An allgather of `send` (one rank's block) into `recv` (every
    /// rank's blocks in rank order).
    pub(super) async fn all_gather_call(&self, send: Side, recv: Side) -> Result<Call> {
        let seq = self.next_seq();
        let m = send.len;
        let desc = self.desc(CollKind::AllGather, send.dtype, None, m, None);
        self.check_dtypes(seq, &desc, send, recv).await?;
        let want = self.size() * m;
        self.check_len(seq, &desc, "recv", recv.len, want, "size * send.len()")
            .await?;
        let plan = plan::allgather(self.rank(), self.size(), m);
        Ok(Call { seq, desc, plan })
    }

    /// A reduce-scatter of `send` (`size` blocks) into `recv` (this rank's
    /// block of the result).
    pub(super) async fn reduce_scatter_call(
        &self,
        send: Side,
        recv: Side,
        op: ReduceOp,
    ) -> Result<Call> {
        let seq = self.next_seq();
        let m = recv.len;
        let desc = self.desc(CollKind::ReduceScatter, send.dtype, Some(op), m, None);
        self.check_dtypes(seq, &desc, send, recv).await?;
        let want = self.size() * m;
        self.check_len(seq, &desc, "send", send.len, want, "size * recv.len()")
            .await?;
        let plan = plan::reduce_scatter(self.rank(), self.size(), m);
        Ok(Call { seq, desc, plan })
    }

    /// Run a checked call on `work`.
    pub(super) async fn run_call(&self, call: Call, work: Work<'_>) -> Result<()> {
        self.run_coll_on(call.seq, call.desc, &call.plan, work)
            .await
    }

    /// Refuse two buffers of different element types (only device buffers
    /// can differ: a host call's slices share one type parameter).
    async fn check_dtypes(&self, seq: u64, desc: &Desc, send: Side, recv: Side) -> Result<()> {
        if send.dtype == recv.dtype {
            return Ok(());
        }
        let e = Err(Error::InvalidArgument {
            rank: self.rank(),
            op: self.op_name(seq, desc),
            detail: format!(
                "send holds {:?} elements but recv holds {:?}; use buffers of one type",
                send.dtype, recv.dtype
            ),
        });
        self.refused(seq, e).await
    }
}
