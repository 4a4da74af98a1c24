//! Collectives on device buffers (see [`crate::gpu`]).
//!
//! The same schedules, sequence numbers, descriptors and failure handling
//! as the host collectives: a device call and a host call with the same
//! element type and length match each other, so ranks may mix them.

use super::coll::Work;
use super::Communicator;
use crate::coll::select::plan;
use crate::coll::CollKind;
use crate::datatype::ReduceOp;
use crate::gpu::DeviceBuffer;
use crate::{Error, Result};

impl Communicator {
    /// [`Communicator::all_reduce`] on a device buffer: every rank's `buf`
    /// becomes the element-wise reduction over all ranks, reduced on the
    /// device, bitwise identical on all ranks.
    pub async fn all_reduce_device(&self, buf: &mut dyn DeviceBuffer, op: ReduceOp) -> Result<()> {
        let seq = self.next_seq();
        let (dtype, n) = (buf.dtype(), buf.len());
        let mut desc = self.desc(CollKind::AllReduce, dtype, Some(op), n, None);
        let plan = self.allreduce_plan(&mut desc);
        self.run_coll_on(seq, desc, &plan, Work::Device(&*buf))
            .await
    }

    /// [`Communicator::broadcast`] on a device buffer.
    pub async fn broadcast_device(&self, buf: &mut dyn DeviceBuffer, root: usize) -> Result<()> {
        let seq = self.next_seq();
        let (dtype, n) = (buf.dtype(), buf.len());
        let mut desc = self.desc(CollKind::Broadcast, dtype, None, n, Some(root));
        self.check_root(seq, &desc, root).await?;
        let plan = self.broadcast_plan(&mut desc, root);
        self.run_coll_on(seq, desc, &plan, Work::Device(&*buf))
            .await
    }

    /// [`Communicator::reduce`] on a device buffer: the result lands in
    /// `buf` of `root`; other ranks' buffers are left unchanged (they
    /// reduce in a scratch copy on their device).
    pub async fn reduce_device(
        &self,
        buf: &mut dyn DeviceBuffer,
        op: ReduceOp,
        root: usize,
    ) -> Result<()> {
        let seq = self.next_seq();
        let (dtype, n) = (buf.dtype(), buf.len());
        let desc = self.desc(CollKind::Reduce, dtype, Some(op), n, Some(root));
        self.check_root(seq, &desc, root).await?;
        let plan = plan::reduce(self.rank(), self.size(), n, root);
        if self.rank() == root {
            return self
                .run_coll_on(seq, desc, &plan, Work::Device(&*buf))
                .await;
        }
        let scratch = self.refused(seq, buf.duplicate(0..n)).await?;
        self.run_coll_on(seq, desc, &plan, Work::Device(&*scratch))
            .await
    }

    /// [`Communicator::all_gather`] on device buffers of one backend and
    /// device: every rank's `send` lands in `recv` of every rank, in rank
    /// order (`recv.len() == size * send.len()`).
    pub async fn all_gather_device(
        &self,
        send: &dyn DeviceBuffer,
        recv: &mut dyn DeviceBuffer,
    ) -> Result<()> {
        let seq = self.next_seq();
        let m = send.len();
        let desc = self.desc(CollKind::AllGather, send.dtype(), None, m, None);
        self.check_dtypes(seq, &desc, send, &*recv).await?;
        self.check_len(
            seq,
            &desc,
            "recv",
            recv.len(),
            self.size() * m,
            "size * send.len()",
        )
        .await?;
        let r = self.rank();
        self.refused(seq, recv.copy_from(send, 0..m, r * m)).await?;
        let plan = plan::allgather(r, self.size(), m);
        self.run_coll_on(seq, desc, &plan, Work::Device(&*recv))
            .await
    }

    /// [`Communicator::reduce_scatter`] on device buffers of one backend
    /// and device: `send` holds `size` blocks of `recv.len()` elements;
    /// rank r receives block r of the reduction over all ranks.
    pub async fn reduce_scatter_device(
        &self,
        send: &dyn DeviceBuffer,
        recv: &mut dyn DeviceBuffer,
        op: ReduceOp,
    ) -> Result<()> {
        let seq = self.next_seq();
        let m = recv.len();
        let (p, r) = (self.size(), self.rank());
        let desc = self.desc(CollKind::ReduceScatter, send.dtype(), Some(op), m, None);
        self.check_dtypes(seq, &desc, send, &*recv).await?;
        self.check_len(seq, &desc, "send", send.len(), p * m, "size * recv.len()")
            .await?;
        let work = self.refused(seq, send.duplicate(0..p * m)).await?;
        let plan = plan::reduce_scatter(r, p, m);
        self.run_coll_on(seq, desc, &plan, Work::Device(&*work))
            .await?;
        recv.copy_from(&*work, r * m..(r + 1) * m, 0)
    }

    async fn check_dtypes(
        &self,
        seq: u64,
        desc: &crate::coll::exec::Desc,
        send: &dyn DeviceBuffer,
        recv: &dyn DeviceBuffer,
    ) -> Result<()> {
        if send.dtype() == recv.dtype() {
            return Ok(());
        }
        let e = Err(Error::InvalidArgument {
            rank: self.rank(),
            op: self.op_name(seq, desc),
            detail: format!(
                "send holds {:?} elements but recv holds {:?}; use buffers of one type",
                send.dtype(),
                recv.dtype()
            ),
        });
        self.refused(seq, e).await
    }
}
