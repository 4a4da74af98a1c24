//! A synchronous facade over [`crate::Communicator`], for training loops
//! that are not async (candle, burn, plain ndarray code).
//!
//! [`init`] builds a tokio runtime owned by the returned [`BlockingCommunicator`];
//! every method blocks the calling thread on the async operation. One
//! background worker thread keeps the connections alive (acknowledgements,
//! keep-alives, receiving messages sent ahead) while the calling thread
//! computes, so long compute phases between calls are fine.
//!
//! ```no_run
//! use rankmesh::{blocking, ReduceOp};
//!
//! fn main() -> rankmesh::Result<()> {
//!     let comm = blocking::init()?; // environment set by `rankrun`
//!     let mut params = vec![0f32; 1000];
//!     comm.broadcast(&mut params, 0)?; // everyone starts from rank 0's
//!     for _step in 0..100 {
//!         let mut grad = vec![0f32; params.len()]; // ... compute the local gradient
//!         comm.all_reduce(&mut grad, ReduceOp::Sum)?;
//!         let n = comm.size() as f32;
//!         params.iter_mut().zip(&grad).for_each(|(p, g)| *p -= 0.01 * g / n);
//!     }
//!     comm.finalize()
//! }
//! ```
//!
//! The facade must not be used from inside an async runtime (it would block
//! that runtime's thread); there, use [`crate::Communicator`] directly.

use crate::bootstrap::JoinSpec;
use crate::config::Config;
use crate::datatype::{Element, ReduceOp};
use crate::{Error, Result};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::runtime::Runtime;

/// The runtime shared by a world communicator and those split from it.
struct Shared {
    rt: Runtime,
    finalized: AtomicBool,
}

/// A blocking [`crate::Communicator`]: same operations, same semantics,
/// no `.await`. Cheap to clone; clones share the runtime.
#[derive(Clone)]
pub struct BlockingCommunicator {
    comm: crate::Communicator,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for BlockingCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockingCommunicator")
            .field("rank", &self.rank())
            .field("size", &self.size())
            .finish()
    }
}

fn runtime() -> Result<Runtime> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(Error::config(
            "rankmesh::blocking used inside an async runtime; use rankmesh::init \
             and the async Communicator there",
        ));
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("rankmesh")
        .enable_all()
        .build()
        .map_err(|e| Error::config(format!("cannot start the tokio runtime: {e}")))
}

fn start<F>(join: F) -> Result<BlockingCommunicator>
where
    F: FnOnce() -> std::pin::Pin<Box<dyn Future<Output = Result<crate::Communicator>>>>,
{
    let rt = runtime()?;
    let comm = rt.block_on(join())?;
    Ok(BlockingCommunicator {
        comm,
        shared: Arc::new(Shared {
            rt,
            finalized: AtomicBool::new(false),
        }),
    })
}

/// Join the job described by the environment (as [`crate::init`]) and
/// return once every rank has joined.
pub fn init() -> Result<BlockingCommunicator> {
    start(|| Box::pin(crate::init()))
}

/// Join the job described by `spec` with explicit settings (as
/// [`crate::launch::init_with`]).
pub fn init_with(spec: JoinSpec, cfg: Config) -> Result<BlockingCommunicator> {
    start(move || Box::pin(crate::comm::init_with(spec, cfg)))
}

impl BlockingCommunicator {
    fn block<T>(&self, fut: impl Future<Output = Result<T>>) -> Result<T> {
        // Blocking inside an async runtime would panic in tokio.
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(Error::config(
                "a rankmesh::blocking method was called from async code; use \
                 BlockingCommunicator::as_async() there",
            ));
        }
        self.shared.rt.block_on(fut)
    }

    /// The async communicator underneath, e.g. to hand to async code
    /// running on [`BlockingCommunicator::runtime`].
    pub fn as_async(&self) -> &crate::Communicator {
        &self.comm
    }

    /// The runtime the facade owns.
    pub fn runtime(&self) -> &Runtime {
        &self.shared.rt
    }

    /// This rank's number, `0..size()`.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.comm.size()
    }

    /// The job id.
    pub fn job_id(&self) -> &str {
        self.comm.job_id()
    }

    /// See [`crate::Communicator::send`].
    pub fn send<T: Element>(&self, data: &[T], dst: usize, tag: u32) -> Result<()> {
        self.block(self.comm.send(data, dst, tag))
    }

    /// See [`crate::Communicator::recv`].
    pub fn recv<T: Element>(&self, buf: &mut [T], src: usize, tag: u32) -> Result<()> {
        self.block(self.comm.recv(buf, src, tag))
    }

    /// See [`crate::Communicator::barrier`].
    pub fn barrier(&self) -> Result<()> {
        self.block(self.comm.barrier())
    }

    /// See [`crate::Communicator::broadcast`].
    pub fn broadcast<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> {
        self.block(self.comm.broadcast(buf, root))
    }

    /// See [`crate::Communicator::all_reduce`].
    pub fn all_reduce<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.block(self.comm.all_reduce(buf, op))
    }

    /// See [`crate::Communicator::reduce`].
    pub fn reduce<T: Element>(&self, buf: &mut [T], op: ReduceOp, root: usize) -> Result<()> {
        self.block(self.comm.reduce(buf, op, root))
    }

    /// See [`crate::Communicator::all_gather`].
    pub fn all_gather<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        self.block(self.comm.all_gather(send, recv))
    }

    /// See [`crate::Communicator::reduce_scatter`].
    pub fn reduce_scatter<T: Element>(
        &self,
        send: &[T],
        recv: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        self.block(self.comm.reduce_scatter(send, recv, op))
    }

    /// See [`crate::Communicator::gather`].
    pub fn gather<T: Element>(&self, send: &[T], recv: &mut [T], root: usize) -> Result<()> {
        self.block(self.comm.gather(send, recv, root))
    }

    /// See [`crate::Communicator::scatter`].
    pub fn scatter<T: Element>(&self, send: &[T], recv: &mut [T], root: usize) -> Result<()> {
        self.block(self.comm.scatter(send, recv, root))
    }

    /// See [`crate::Communicator::all_to_all`].
    pub fn all_to_all<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        self.block(self.comm.all_to_all(send, recv))
    }

    /// See [`crate::Communicator::split`]; the new communicator shares
    /// this one's runtime.
    pub fn split(&self, color: u32, key: u32) -> Result<BlockingCommunicator> {
        let comm = self.block(self.comm.split(color, key))?;
        Ok(BlockingCommunicator {
            comm,
            shared: self.shared.clone(),
        })
    }

    /// See [`crate::Communicator::abort`].
    pub fn abort(&self, reason: &str) -> Result<()> {
        self.block(async {
            self.comm.abort(reason).await;
            Ok(())
        })
    }

    /// Leave the job cleanly (see [`crate::Communicator::finalize`]). Call
    /// it once at the end; a communicator dropped without it finalizes when
    /// the last handle goes.
    pub fn finalize(&self) -> Result<()> {
        let out = self.block(self.comm.finalize());
        self.shared.finalized.store(true, Ordering::Release);
        out
    }
}

impl Drop for BlockingCommunicator {
    fn drop(&mut self) {
        // The last handle: leave cleanly before the runtime (and with it the
        // connections) goes away, unless that would block an async runtime.
        if Arc::strong_count(&self.shared) == 1
            && !self.shared.finalized.load(Ordering::Acquire)
            && tokio::runtime::Handle::try_current().is_err()
        {
            let _ = self.shared.rt.block_on(self.comm.finalize());
        }
    }
}
