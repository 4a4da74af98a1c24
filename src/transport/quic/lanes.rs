//! Transport threads: the extra endpoints ("lanes") a rank's large QUIC
//! messages are striped across.
//!
//! A rank with `transport_threads = n` binds `n - 1` lanes besides its main
//! endpoint. Each lane is a UDP socket and a quinn endpoint whose every task
//! (the endpoint's driver, each connection's driver: packet encryption,
//! decryption, acknowledgements, loss recovery) runs on a thread of its own,
//! with a current-thread tokio runtime. Lane `k` of one rank talks only to
//! lane `k` of another, so both the sending and the receiving side of a
//! part run on lane threads. The main endpoint stays on the caller's
//! runtime and carries everything else: small messages, part 0 of a striped
//! message with its header, the goodbye and the close reasons.

use crate::config::Config;
use crate::{Error, Result};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

/// A quinn runtime that spawns every task of an endpoint on one lane
/// thread, whichever thread asks (a connection dialled from the caller's
/// task is still driven on the lane).
#[derive(Debug)]
struct LaneRuntime(tokio::runtime::Handle);

impl quinn::Runtime for LaneRuntime {
    fn new_timer(&self, at: std::time::Instant) -> Pin<Box<dyn quinn::AsyncTimer>> {
        let _in = self.0.enter();
        quinn::TokioRuntime.new_timer(at)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        self.0.spawn(future);
    }

    fn wrap_udp_socket(
        &self,
        sock: std::net::UdpSocket,
    ) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        let _in = self.0.enter();
        quinn::TokioRuntime.wrap_udp_socket(sock)
    }

    fn now(&self) -> std::time::Instant {
        quinn::TokioRuntime.now()
    }
}

/// One lane: its endpoint and the runtime of its thread.
#[derive(Clone)]
pub(super) struct Lane {
    pub(super) endpoint: quinn::Endpoint,
    pub(super) runtime: tokio::runtime::Handle,
}

/// A rank's lanes and their threads; the threads stop when this is dropped.
pub struct Lanes {
    lanes: Vec<Lane>,
    /// Dropping these ends each thread's runtime (and every task on it).
    _stops: Vec<tokio::sync::oneshot::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Lanes {
    /// Stop the threads and wait for them, so that none outlives its
    /// transport (each ends as soon as its runtime has dropped its tasks).
    fn drop(&mut self) {
        self._stops.clear();
        let me = std::thread::current().id();
        for t in self.threads.drain(..) {
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }
}

impl Lanes {
    /// No lanes: one transport thread.
    pub fn none() -> Lanes {
        Lanes {
            lanes: Vec::new(),
            _stops: Vec::new(),
            threads: Vec::new(),
        }
    }

    /// Start `threads - 1` lanes, each bound to a free UDP port on `ip`
    /// and driven by a thread of its own.
    pub fn start(ip: IpAddr, cfg: &Config, threads: usize) -> Result<Lanes> {
        let mut out = Lanes::none();
        for k in 1..threads {
            let (runtime, stop, thread) = lane_thread(k)?;
            out.threads.push(thread);
            let endpoint = super::endpoint::bind_on(
                SocketAddr::new(ip, 0),
                cfg,
                Arc::new(LaneRuntime(runtime.clone())),
            )?;
            out.lanes.push(Lane { endpoint, runtime });
            out._stops.push(stop);
        }
        Ok(out)
    }

    /// The lanes' UDP ports, in lane order (for the join request).
    pub fn ports(&self) -> Result<Vec<u16>> {
        self.lanes
            .iter()
            .map(|l| {
                l.endpoint.local_addr().map(|a| a.port()).map_err(|e| {
                    Error::transport(None, format!("transport thread endpoint address: {e}"))
                })
            })
            .collect()
    }

    /// Take the senders whose drop stops each lane's thread (tests stop a
    /// lane on purpose with them; dropping the lanes then waits until they
    /// are dropped).
    #[cfg(test)]
    pub(crate) fn take_stops(&mut self) -> Vec<tokio::sync::oneshot::Sender<()>> {
        std::mem::take(&mut self._stops)
    }

    pub(super) fn lanes(&self) -> &[Lane] {
        &self.lanes
    }
}

/// Start lane thread `k`: a current-thread runtime that runs until the
/// returned sender is dropped.
fn lane_thread(
    k: usize,
) -> Result<(
    tokio::runtime::Handle,
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<()>,
)> {
    let fail = |e: std::io::Error| {
        Error::transport(None, format!("cannot start transport thread {k}: {e}"))
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(format!("rankmesh-lane{k}"))
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let _ = tx.send(Ok(rt.handle().clone()));
            rt.block_on(async {
                let _ = stop_rx.await;
            });
        })
        .map_err(fail)?;
    let handle = rx
        .recv()
        .map_err(|_| fail(std::io::Error::other("the thread ended at once")))?
        .map_err(fail)?;
    Ok((handle, stop_tx, thread))
}
