//! Collectives on device buffers (see [`crate::gpu`]).
//!
//! The same schedules, sequence numbers, descriptors and failure handling
//! as the host collectives (both are set up in `call.rs`): a device call
//! and a host call with the same element type and length match each
//! other, so ranks may mix them.

use super::call::Side;
use super::coll::Work;
use super::Communicator;
use crate::datatype::ReduceOp;
use crate::gpu::DeviceBuffer;
use crate::Result;

fn side(b: &dyn DeviceBuffer) -> Side {
    Side::new(b.dtype(), b.len())
}

impl Communicator {
    /// [`Communicator::all_reduce`] on a device buffer: every rank's `buf`
    /// becomes the element-wise reduction over all ranks, reduced on the
    /// device, bitwise identical on all ranks.
    pub async fn all_reduce_device(&self, buf: &mut dyn DeviceBuffer, op: ReduceOp) -> Result<()> {
        let call = self.all_reduce_call(buf.dtype(), op, buf.len());
        self.run_call(call, Work::Device(&*buf)).await
    }

    /// [`Communicator::broadcast`] on a device buffer.
    pub async fn broadcast_device(&self, buf: &mut dyn DeviceBuffer, root: usize) -> Result<()> {
        let call = self.broadcast_call(buf.dtype(), buf.len(), root).await?;
        self.run_call(call, Work::Device(&*buf)).await
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
        let n = buf.len();
        let call = self.reduce_call(buf.dtype(), op, n, root).await?;
        if self.rank() == root {
            return self.run_call(call, Work::Device(&*buf)).await;
        }
        let scratch = self.refused(call.seq, buf.duplicate(0..n)).await?;
        self.run_call(call, Work::Device(&*scratch)).await
    }

    /// [`Communicator::all_gather`] on device buffers of one backend and
    /// device: every rank's `send` lands in `recv` of every rank, in rank
    /// order (`recv.len() == size * send.len()`).
    pub async fn all_gather_device(
        &self,
        send: &dyn DeviceBuffer,
        recv: &mut dyn DeviceBuffer,
    ) -> Result<()> {
        let call = self.all_gather_call(side(send), side(&*recv)).await?;
        let (r, m) = (self.rank(), send.len());
        self.refused(call.seq, recv.copy_from(send, 0..m, r * m))
            .await?;
        self.run_call(call, Work::Device(&*recv)).await
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
        let call = self
            .reduce_scatter_call(side(send), side(&*recv), op)
            .await?;
        let (p, r, m) = (self.size(), self.rank(), recv.len());
        let work = self.refused(call.seq, send.duplicate(0..p * m)).await?;
        self.run_call(call, Work::Device(&*work)).await?;
        recv.copy_from(&*work, r * m..(r + 1) * m, 0)
    }
}
