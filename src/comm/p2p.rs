//! Tagged point-to-point messages.
//!
//! Each message of one (destination, tag) pair carries a message number
//! assigned at `send` time; the receiver's mailbox hands messages out in that
//! order, so messages of one sender and tag never overtake each other (MPI's
//! non-overtaking rule) although each travels on its own stream.

use super::recorder::What;
use super::Communicator;
use crate::comm::World;
use crate::datatype::Element;
use crate::transport::{P2pKey, Payload};
use crate::wire::{FrameKind, Header};
use crate::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

impl Communicator {
    /// Send `data` to rank `dst` with `tag`. Returns once the data is owned
    /// by rankmesh (copied), possibly before `dst` posted its receive; large
    /// messages may wait until the receiver has room (flow control).
    pub async fn send<T: Element>(&self, data: &[T], dst: usize, tag: u32) -> Result<()> {
        let world = &self.inner.world;
        let guard = world.recorder.start(
            self.inner.comm_id,
            world.next_p2p_op(),
            "send",
            What::P2p {
                to: true,
                peer: dst,
                tag,
                count: data.len(),
                dtype: T::DTYPE,
            },
            std::mem::size_of_val(data) as u64,
            "p2p",
            1,
        );
        let res = self.send_inner(data, dst, tag).await;
        guard.finish(&res);
        res
    }

    async fn send_inner<T: Element>(&self, data: &[T], dst: usize, tag: u32) -> Result<()> {
        let op = || format!("send to rank {dst} tag {tag}");
        self.check_open(op)?;
        self.check_rank(op, "destination", dst)?;
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let limit = self.config().max_message_bytes();
        if bytes.len() as u64 > limit {
            // Refused here: the receiver would refuse it too, and close the
            // whole connection as a protocol violation.
            return Err(Error::InvalidArgument {
                rank: self.rank(),
                op: op(),
                detail: format!(
                    "{} bytes is more than the largest message, {limit} bytes; send it in \
                     parts or raise Config::set_max_message_bytes on every rank",
                    bytes.len()
                ),
            });
        }
        let mut h = Header::new(
            FrameKind::P2p,
            self.world_rank(self.rank()) as u32,
            self.inner.comm_id,
            self.inner.epoch,
        );
        h.dtype = T::DTYPE;
        h.seq = tag as u64;
        h.len = bytes.len() as u64;
        h.total = data.len() as u64;
        let world_dst = self.world_rank(dst);
        // The message number is taken when the transport commits the header
        // (after waiting for a stream or slot, if it must), so that this
        // send, held back, holds back no later message to that rank.
        let taken = AtomicU64::new(UNNUMBERED);
        let stamp = || {
            let mut next = self
                .inner
                .p2p_next
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let c = next.entry(dst).or_insert(0);
            let n = *c;
            *c += 1;
            taken.store(n, Ordering::Release);
            n
        };
        // If this send does not complete (cancelled, timed out, failed)
        // after it was numbered, the receiver is told to skip its number,
        // so that later messages to that rank are not held behind it.
        let mut skip = SkipOnDrop {
            world: Some(self.inner.world.clone()),
            dst: world_dst,
            header: h,
            taken: &taken,
        };
        let res = self
            .bounded(&op, &[dst], async {
                self.transport()
                    .send(world_dst, h, Payload::Borrowed(bytes), Some(&stamp))
                    .await
                    .map_err(|f| self.lost(&op(), f))
            })
            .await;
        if res.is_ok() {
            skip.world = None;
        }
        res
    }

    /// Receive the next message from rank `src` with `tag` into `buf`, whose
    /// length and element type must match what was sent.
    pub async fn recv<T: Element>(&self, buf: &mut [T], src: usize, tag: u32) -> Result<()> {
        let world = &self.inner.world;
        let guard = world.recorder.start(
            self.inner.comm_id,
            world.next_p2p_op(),
            "recv",
            What::P2p {
                to: false,
                peer: src,
                tag,
                count: buf.len(),
                dtype: T::DTYPE,
            },
            std::mem::size_of_val(buf) as u64,
            "p2p",
            1,
        );
        let res = self.recv_inner(buf, src, tag).await;
        guard.finish(&res);
        res
    }

    async fn recv_inner<T: Element>(&self, buf: &mut [T], src: usize, tag: u32) -> Result<()> {
        let op = || format!("recv from rank {src} tag {tag}");
        self.check_open(op)?;
        self.check_rank(op, "source", src)?;
        let key = P2pKey {
            src: self.world_rank(src) as u32,
            comm_id: self.inner.comm_id,
            epoch: self.inner.epoch,
            tag: tag as u64,
        };
        let out: &mut [u8] = bytemuck::cast_slice_mut(buf);
        let want = out.len() as u64;
        let me = self.rank();
        self.bounded(&op, &[src], async {
            let mut m = self
                .transport()
                .mailbox()
                .recv_p2p(key)
                .await
                .map_err(|f| self.lost(&op(), f))?;
            let h = *m.header();
            if h.dtype != T::DTYPE {
                return Err(Error::Mismatch {
                    rank: me,
                    op: op(),
                    detail: format!(
                        "rank {src} sent {} elements of {}, this rank receives into a buffer of {}",
                        h.total,
                        h.dtype,
                        T::DTYPE
                    ),
                });
            }
            if h.len != want {
                return Err(Error::InvalidArgument {
                    rank: me,
                    op: op(),
                    detail: format!(
                        "rank {src} sent {} bytes ({} elements of {}), the receive buffer holds \
                         {want} bytes ({} elements); both sides must agree on the length",
                        h.len,
                        h.total,
                        h.dtype,
                        want / T::DTYPE.size() as u64
                    ),
                });
            }
            m.read_into(out).await.map_err(|e| Error::Transport {
                rank: Some(me),
                detail: format!("{}: the message from rank {src} broke off: {e}", op()),
            })
        })
        .await
    }
}

/// A message number not taken yet.
const UNNUMBERED: u64 = u64::MAX;

/// Sends a Skip frame for a point-to-point message whose send did not
/// complete after it was numbered (see [`Communicator::send`]).
struct SkipOnDrop<'a> {
    world: Option<Arc<World>>,
    dst: usize,
    header: Header,
    taken: &'a AtomicU64,
}

impl Drop for SkipOnDrop<'_> {
    fn drop(&mut self) {
        let Some(world) = self.world.take() else {
            return;
        };
        let n = self.taken.load(Ordering::Acquire);
        if n == UNNUMBERED {
            // Never numbered: the receiver waits for nothing.
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut h = self.header;
        h.kind = FrameKind::Skip;
        h.sub = n;
        h.len = 0;
        let dst = self.dst;
        let t = world.transport.clone();
        // Kept by the world: a graceful finish waits for it, so the skip
        // reaches the peer before this rank's goodbye.
        let mut notices = world.notices.lock().unwrap_or_else(|p| p.into_inner());
        while notices.try_join_next().is_some() {}
        notices.spawn_on(
            async move {
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    t.send(dst, h, Payload::Owned(Vec::new()), None),
                )
                .await;
            },
            &rt,
        );
    }
}
