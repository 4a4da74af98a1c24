//! Runs a [`Schedule`] on a [`DeviceBuffer`].
//!
//! The same schedules as on host memory; what changes is where bytes come
//! from and go to. A send streams its range off the device (the buffer
//! stages it chunk by chunk while the transport sends the chunks already
//! staged); a receive streams the arriving chunks onto the device, where
//! they overwrite the range or are reduced into it by a kernel, while later
//! chunks are still arriving.
//!
//! A phase whose sends read a range its receives write (recursive
//! doubling) stages its sends completely first, so they carry the buffer
//! as it was when the phase began.

use super::exec::{both, join_all, Ctx, ExecError, SendFut};
use super::{Phase, Recv, Schedule};
use crate::gpu::{DeviceBuffer, DEFAULT_RING};
use crate::transport::Payload;
use bytes::Bytes;
use std::ops::Range;
use tokio::sync::mpsc;

/// Network pieces queued between a receive and the device's staging.
const RECV_PIECES: usize = 16;

fn overlaps(a: &Range<usize>, b: &Range<usize>) -> bool {
    a.start < b.end && b.start < a.end
}

impl Ctx<'_> {
    /// Run `sched` with `work` as the working buffer.
    pub(crate) async fn run_device(
        &self,
        sched: &Schedule,
        work: &dyn DeviceBuffer,
    ) -> Result<(), ExecError> {
        for ph in &sched.phases {
            self.step(ph, self.phase_device(ph, work)).await?;
        }
        Ok(())
    }

    async fn phase_device(&self, ph: &Phase, work: &dyn DeviceBuffer) -> Result<(), ExecError> {
        let esz = self.desc.dtype.size();
        let snapshot = ph
            .sends
            .iter()
            .any(|s| ph.recvs.iter().any(|r| overlaps(&s.range, &r.range)));
        let mut sends: Vec<Option<SendFut<'_>>> = Vec::with_capacity(ph.sends.len());
        for x in &ph.sends {
            let len = x.range.len() * esz;
            let h = self.header(ph.sub, len);
            let dst = self.members[x.peer];
            if snapshot {
                let data = staged(work, x.range.clone()).await?;
                let fut = self.transport.send(dst, h, Payload::Owned(data), None);
                sends.push(Some(Box::pin(async move {
                    fut.await.map_err(|failure| ExecError::Peer { failure })
                })));
                continue;
            }
            let (tx, rx) = mpsc::channel(DEFAULT_RING);
            let produce = work.download(x.range.clone(), tx);
            let send = self
                .transport
                .send(dst, h, Payload::Stream { len, chunks: rx }, None);
            sends.push(Some(Box::pin(async move {
                let (p, s) = tokio::join!(produce, send);
                // The device's own failure explains a send cut short.
                p.map_err(device)?;
                s.map_err(|failure| ExecError::Peer { failure })
            })));
        }
        let recvs = async {
            for x in &ph.recvs {
                let op = match ph.mode {
                    Recv::Reduce => self.desc.op,
                    Recv::Copy => None,
                };
                self.recv_device(ph.sub, x.peer, op, work, x.range.clone())
                    .await?;
            }
            Ok(())
        };
        both(join_all(sends), recvs).await
    }

    async fn recv_device(
        &self,
        sub: u64,
        peer: usize,
        op: Option<crate::datatype::ReduceOp>,
        work: &dyn DeviceBuffer,
        range: Range<usize>,
    ) -> Result<(), ExecError> {
        let want = range.len() * self.desc.dtype.size();
        let mut m = self.message(sub, peer, want).await?;
        // Room for several network pieces, so that reading the socket does
        // not wait for the device's staging of each one.
        let (tx, rx) = mpsc::channel(RECV_PIECES);
        let pump = async move {
            let mut got = 0;
            while let Some(chunk) = m
                .next_chunk()
                .await
                .map_err(|b| ExecError::Broken { peer, detail: b.0 })?
            {
                got += chunk.len();
                if tx.send(chunk).await.is_err() {
                    // The device gave up; its error explains why.
                    return Ok(());
                }
            }
            if got != want {
                return Err(ExecError::Broken {
                    peer,
                    detail: format!("message ended after {got} of {want} bytes"),
                });
            }
            Ok(())
        };
        let (p, u) = tokio::join!(pump, work.upload(range, op, rx));
        // A broken message explains a short upload.
        p?;
        u.map_err(device)
    }
}

fn device(e: crate::Error) -> ExecError {
    ExecError::Device {
        detail: match e {
            crate::Error::Gpu { detail } => detail,
            other => other.to_string(),
        },
    }
}

/// The elements `range` of `work`, staged to the host completely.
async fn staged(work: &dyn DeviceBuffer, range: Range<usize>) -> Result<Vec<Bytes>, ExecError> {
    let (tx, mut rx) = mpsc::channel(DEFAULT_RING);
    let collect = async {
        let mut v = Vec::new();
        while let Some(b) = rx.recv().await {
            v.push(b);
        }
        v
    };
    let (r, v) = tokio::join!(work.download(range, tx), collect);
    r.map_err(device)?;
    Ok(v)
}
