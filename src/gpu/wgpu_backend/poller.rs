//! One thread per device that polls it while work is pending, so that
//! mapped-buffer callbacks fire without an async runtime's help.

use super::*;

/// Completes wgpu's buffer mappings: blocks in `Device::poll` on its own
/// thread while mappings are outstanding, so async code just awaits them.
pub(super) struct Poller {
    state: Arc<(Mutex<PollState>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct PollState {
    pending: usize,
    stop: bool,
}

/// One outstanding mapping; `finish` when its callback ran.
pub(super) struct Pending(Arc<(Mutex<PollState>, Condvar)>);

impl Pending {
    /// The mapping's callback ran.
    pub(super) fn finish(self) {}
}

impl Drop for Pending {
    // Also when wgpu drops a callback without calling it: the poller must
    // not wait (or spin) for a mapping that will never complete.
    fn drop(&mut self) {
        let mut s = lock(&self.0 .0);
        s.pending = s.pending.saturating_sub(1);
    }
}

impl Poller {
    pub(super) fn start(device: wgpu::Device) -> Poller {
        let state: Arc<(Mutex<PollState>, Condvar)> = Arc::default();
        let st = state.clone();
        let thread = std::thread::Builder::new()
            .name("rankmesh-wgpu-poll".into())
            .spawn(move || loop {
                {
                    let (m, cv) = &*st;
                    let mut s = lock(m);
                    while s.pending == 0 && !s.stop {
                        s = cv.wait(s).unwrap_or_else(|p| p.into_inner());
                    }
                    if s.stop {
                        return;
                    }
                }
                if let Err(e) = device.poll(wgpu::PollType::wait_indefinitely()) {
                    tracing::warn!("wgpu poll: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            })
            .ok();
        Poller { state, thread }
    }

    pub(super) fn expect(&self) -> Pending {
        let (m, cv) = &*self.state;
        lock(m).pending += 1;
        cv.notify_one();
        Pending(self.state.clone())
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        let (m, cv) = &*self.state;
        lock(m).stop = true;
        cv.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
