//! The CUDA backend: `cudarc::driver::CudaSlice<T>` buffers, reduced by
//! kernels compiled at run time with NVRTC.
//!
//! cudarc loads the driver and NVRTC libraries at run time, so the crate
//! builds without a CUDA toolkit; [`Cuda::new`] checks that they are present
//! (cudarc would panic on first use otherwise) and returns a clear error
//! when they are not.
//!
//! One stream per [`Cuda`] carries every copy and kernel, so they execute in
//! issue order. Staging slots are pinned host buffers (write-combined for
//! uploads, plain for downloads, which the host reads) plus a device
//! scratch buffer per upload slot; they live in pools and a transfer keeps
//! `ring` of them in flight. Waiting on the device happens on tokio's
//! blocking pool, never on an async worker.

mod buffer;
mod kernels;
mod staging;

pub use buffer::CudaBuffer;
use kernels::{kernel_name, load_kernels};
use staging::{DownSlot, StagedChunk, UpSlot};

use super::nvrtc::{candidates, Nvrtc};
use super::resident::Resident;
use super::{check_range, exact_sides, gpu_err, staging_plan, StagedCopy};
use crate::datatype::{DType, Element, ReduceOp};
use crate::Result;
use bytes::Bytes;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, DevicePtr,
    DeviceRepr, LaunchConfig, PinnedHostSlice, PushKernelArg, ValidAsZeroBits,
};
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use tokio::sync::mpsc;

/// Element types the CUDA backend reduces.
pub trait CudaElement: Element + DeviceRepr + ValidAsZeroBits {}
impl CudaElement for f32 {}
impl CudaElement for f64 {}
impl CudaElement for i32 {}
impl CudaElement for u32 {}
impl CudaElement for i64 {}
impl CudaElement for u64 {}
impl CudaElement for half::f16 {}
impl CudaElement for half::bf16 {}

/// How to open a device.
#[derive(Clone, Debug)]
pub struct CudaOptions {
    /// Device ordinal. `None`: `RANKMESH_GPU_DEVICE`, else the process's
    /// local rank (modulo the device count).
    pub device: Option<usize>,
    /// Bytes per staged chunk (at least 256). Memory cost per concurrent
    /// transfer: `ring` chunks of pinned host memory (plus as much device
    /// scratch for receives).
    pub chunk_bytes: usize,
    /// Staging buffers one transfer keeps in flight (at least 1).
    pub ring: usize,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            device: None,
            chunk_bytes: 4 * super::DEFAULT_CHUNK_BYTES,
            ring: 3,
        }
    }
}

/// A CUDA device prepared for collectives: two streams, the compiled
/// kernels and staging pools. Cheap to clone.
#[derive(Clone)]
pub struct Cuda {
    shared: Arc<Shared>,
}

struct Shared {
    ctx: Arc<CudaContext>,
    /// Uploads, reductions and device copies.
    stream: Arc<CudaStream>,
    /// Downloads, so that copies to the host overlap copies to the device
    /// (each direction has its own copy engine).
    down: Arc<CudaStream>,
    module: Arc<CudaModule>,
    name: String,
    chunk: usize,
    ring: usize,
    ups: Mutex<Vec<UpSlot>>,
    downs: Arc<Mutex<Vec<DownSlot>>>,
}

// A slot's pinned memory must outlive the copies queued into or out of it:
// a slot dropped on an error path first waits for its last one.

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Cuda {
    /// Open the device this process should use (see
    /// [`CudaOptions::device`]) and compile the kernels. Without a CUDA
    /// driver or NVRTC this is an error saying so, not a panic.
    pub fn new(opts: CudaOptions) -> Result<Cuda> {
        // SAFETY: only tries to load the driver library by its usual names
        // (libcuda.so, libcuda.so.1, ...).
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(gpu_err(
                "no CUDA driver found (libcuda could not be loaded); use a host with an NVIDIA \
                 driver, or the wgpu backend",
            ));
        }
        let fail = |what: &str, e: &dyn std::fmt::Display| gpu_err(format!("CUDA {what}: {e}"));
        let count = CudaContext::device_count().map_err(|e| fail("device count", &e))?;
        if count <= 0 {
            return Err(gpu_err("the CUDA driver reports no devices"));
        }
        let ordinal = match opts.device {
            Some(d) => d,
            None => crate::env::gpu_device_index()?,
        } % count as usize;
        let ctx = CudaContext::new(ordinal).map_err(|e| fail("context", &e))?;
        let stream = ctx.new_stream().map_err(|e| fail("stream", &e))?;
        let down = ctx.new_stream().map_err(|e| fail("stream", &e))?;
        let module = load_kernels(&ctx)?;
        let dev = ctx.name().unwrap_or_else(|_| format!("device {ordinal}"));
        Ok(Cuda {
            shared: Arc::new(Shared {
                ctx,
                stream,
                down,
                module,
                name: format!("cuda ({dev})"),
                chunk: opts.chunk_bytes.max(256) / 8 * 8,
                ring: opts.ring.max(1),
                ups: Mutex::default(),
                downs: Arc::default(),
            }),
        })
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.shared.ctx
    }

    /// The stream collectives reduce on. Work the application queued on
    /// other streams is waited for through cudarc's event tracking.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.shared.stream
    }

    /// Device name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Wait until everything queued by collectives has executed.
    pub async fn synchronize(&self) -> Result<()> {
        self.shared.synchronize().await
    }
}

/// How long a wait for the device polls before it sleeps.
const SPIN: std::time::Duration = std::time::Duration::from_micros(300);

/// Run `f` on `s` on tokio's blocking pool (waits for the device happen
/// there: the events are created with blocking sync, so the waiting thread
/// sleeps rather than spins, and never holds up an async worker).
async fn blocking<S: Send + 'static, R: Send + 'static>(
    mut s: S,
    f: impl FnOnce(&mut S) -> R + Send + 'static,
) -> Result<(S, R)> {
    match tokio::task::spawn_blocking(move || {
        let r = f(&mut s);
        (s, r)
    })
    .await
    {
        Ok(x) => Ok(x),
        Err(e) => match e.try_into_panic() {
            Ok(p) => std::panic::resume_unwind(p),
            Err(e) => Err(gpu_err(format!("waiting for the device: {e}"))),
        },
    }
}

impl Shared {
    fn err(&self, what: &str, e: impl std::fmt::Display) -> crate::Error {
        gpu_err(format!("{}: {what}: {e}", self.name))
    }

    async fn synchronize(&self) -> Result<()> {
        let (up, down) = (self.stream.clone(), self.down.clone());
        tokio::task::spawn_blocking(move || up.synchronize().and_then(|()| down.synchronize()))
            .await
            .map_err(|e| self.err("synchronize", e))?
            .map_err(|e| self.err("synchronize", e))
    }

    fn function(&self, dtype: DType, op: Option<ReduceOp>) -> Result<CudaFunction> {
        let name = kernel_name(dtype, op);
        self.module
            .load_function(&name)
            .map_err(|e| self.err(&format!("kernel {name}"), e))
    }

    fn event(&self) -> Result<CudaEvent> {
        self.ctx
            .new_event(Some(CUevent_flags::CU_EVENT_BLOCKING_SYNC))
            .map_err(|e| self.err("event", e))
    }

    fn up_slot(&self) -> Result<UpSlot> {
        if let Some(s) = lock(&self.ups).pop() {
            return Ok(s);
        }
        // SAFETY: the contents are unset; every use writes before reading.
        let pinned = unsafe { self.ctx.alloc_pinned::<u8>(self.chunk) }
            .map_err(|e| self.err("pinned allocation", e))?;
        let scratch = self
            .stream
            .alloc_zeros::<u8>(self.chunk)
            .map_err(|e| self.err("scratch allocation", e))?;
        Ok(UpSlot {
            pinned,
            scratch,
            done: self.event()?,
        })
    }

    fn down_slot(&self) -> Result<DownSlot> {
        if let Some(s) = lock(&self.downs).pop() {
            return Ok(s);
        }
        // SAFETY: the contents are unset; every use copies into it first.
        // Not write-combined: the host reads these.
        let pinned = unsafe { self.ctx.alloc_pinned_with_flags::<u8>(self.chunk, 0) }
            .map_err(|e| self.err("pinned allocation", e))?;
        Ok(DownSlot {
            pinned,
            done: self.event()?,
        })
    }

    /// Queue the copy `c` from the device bytes `src` into `slot` on the
    /// download stream, exactly `c.dev.len()` bytes, and record the slot's
    /// event after it. Every copy to the host goes through here.
    fn copy_to_host(
        &self,
        src: &CudaView<'_, u8>,
        c: &StagedCopy,
        slot: &mut DownSlot,
    ) -> Result<()> {
        let host = slot
            .pinned
            .as_mut_slice()
            .map_err(|e| self.err("copy to host", e))?;
        let (dev, host) = exact_sides(c, src.len(), host)?;
        let part = src
            .try_slice(dev)
            .ok_or_else(|| self.err("copy to host", "range outside the buffer"))?;
        // Both sides hold exactly `c.dev.len()` bytes, which is what cudarc
        // copies (the destination's length).
        self.down
            .memcpy_dtoh(&part, host)
            .map_err(|e| self.err("copy to host", e))?;
        slot.done
            .record(&self.down)
            .map_err(|e| self.err("copy to host", e))
    }

    /// Queue the copy of the first `c.host.len()` bytes of `slot`'s pinned
    /// memory into its device scratch, exactly that many bytes. Every copy
    /// to the device goes through here. (The caller records the event after
    /// the kernel that reads the scratch.)
    fn copy_to_device(&self, c: &StagedCopy, slot: &mut UpSlot) -> Result<()> {
        let host = slot
            .pinned
            .as_mut_slice()
            .map_err(|e| self.err("copy to device", e))?;
        let scratch_len = slot.scratch.len();
        // The scratch plays the device side, at offset 0.
        let local = StagedCopy {
            dev: 0..c.dev.len(),
            slot: c.slot,
            host: c.host.clone(),
        };
        let (dev, host) = exact_sides(&local, scratch_len, host)?;
        let mut scratch = slot
            .scratch
            .try_slice_mut(dev)
            .ok_or_else(|| self.err("copy to device", "range outside the scratch buffer"))?;
        let host: &[u8] = host;
        self.stream
            .memcpy_htod(host, &mut scratch)
            .map_err(|e| self.err("copy to device", e))
    }

    async fn download<T: CudaElement>(
        &self,
        src: &CudaSlice<T>,
        bytes: Range<usize>,
        out: mpsc::Sender<Bytes>,
    ) -> Result<()> {
        // SAFETY: every bit pattern is a valid u8, and u8 has alignment 1;
        // the view covers exactly the slice's bytes.
        let view = unsafe { src.transmute::<u8>(src.len() * std::mem::size_of::<T>()) }
            .ok_or_else(|| self.err("download", "cannot view the buffer as bytes"))?;
        // Copies and reductions queued on the main stream (by earlier
        // calls) come before these reads.
        self.down
            .join(&self.stream)
            .map_err(|e| self.err("download", e))?;
        let mut plan = staging_plan(bytes, self.chunk, self.ring);
        let mut inflight: VecDeque<(DownSlot, usize)> = VecDeque::new();
        let res: Result<()> = async {
            loop {
                while inflight.len() < self.ring {
                    let Some(c) = plan.next() else { break };
                    let mut slot = self.down_slot()?;
                    let queued = self.copy_to_host(&view, &c, &mut slot);
                    inflight.push_back((slot, c.dev.len()));
                    queued?;
                }
                let Some((slot, n)) = inflight.pop_front() else {
                    return Ok(());
                };
                let slot = self.settled(slot, |s| &s.done).await?;
                let chunk = StagedChunk::new(slot, n, self.downs.clone())?;
                if out.send(Bytes::from_owner(chunk)).await.is_err() {
                    return Ok(());
                }
            }
        }
        .await;
        // Slots still in flight go back to the pool only after their copies
        // have landed (the device may still be writing them).
        if !inflight.is_empty() {
            let slots: Vec<DownSlot> = inflight.into_iter().map(|(s, _)| s).collect();
            if let Ok((slots, Ok(()))) =
                blocking(slots, |ss| ss.iter().try_for_each(|s| s.done.synchronize())).await
            {
                lock(&self.downs).extend(slots);
            }
        }
        res
    }

    async fn upload<T: CudaElement>(
        &self,
        dst: &CudaSlice<T>,
        bytes: Range<usize>,
        op: Option<ReduceOp>,
        mut input: mpsc::Receiver<Bytes>,
    ) -> Result<()> {
        let func = self.function(T::DTYPE, op)?;
        let esz = std::mem::size_of::<T>();
        let chunk = self.chunk / esz * esz;
        let mut plan = staging_plan(bytes.clone(), chunk, self.ring);
        let mut ring: Vec<Option<UpSlot>> = (0..self.ring).map(|_| None).collect();
        // Reads of this buffer queued on the download stream come first.
        self.stream
            .join(&self.down)
            .map_err(|e| self.err("upload", e))?;
        let (dst_ptr, dst_sync) = dst.device_ptr(&self.stream);
        // The chunk being filled: its plan, its slot, and how many of its
        // bytes have arrived. Arriving pieces are copied into the pinned
        // slot as they come (so staging overlaps the network), and a full
        // chunk is copied to the device and reduced there while the next
        // one fills.
        let mut cur: Option<(StagedCopy, UpSlot, usize)> = None;
        let mut left = bytes.len();
        let res = async {
            while left > 0 {
                let Some(mut piece) = input.recv().await else {
                    return Err(gpu_err(format!("input ended {left} bytes short")));
                };
                if piece.len() > left {
                    return Err(gpu_err("more bytes arrived than the range holds"));
                }
                left -= piece.len();
                while !piece.is_empty() {
                    let (c, mut slot, fill) = match cur.take() {
                        Some(x) => x,
                        None => {
                            let c = plan
                                .next()
                                .ok_or_else(|| self.err("upload", "more chunks than planned"))?;
                            let slot = match ring[c.slot].take() {
                                Some(s) => s,
                                None => self.up_slot()?,
                            };
                            // Its previous chunk must have left the slot.
                            let slot = self.settled(slot, |s| &s.done).await?;
                            (c, slot, 0)
                        }
                    };
                    let take = (c.dev.len() - fill).min(piece.len());
                    {
                        let buf = slot
                            .pinned
                            .as_mut_slice()
                            .map_err(|e| self.err("staging", e))?;
                        let dst = buf.get_mut(fill..fill + take).ok_or_else(|| {
                            self.err("staging", "a piece does not fit its staging slot")
                        })?;
                        dst.copy_from_slice(&piece.split_to(take));
                    }
                    let fill = fill + take;
                    if fill < c.dev.len() {
                        cur = Some((c, slot, fill));
                        continue;
                    }
                    // The chunk is complete: to the device, then reduce.
                    self.copy_to_device(&c, &mut slot)?;
                    let (src_ptr, src_sync) = slot.scratch.device_ptr(&self.stream);
                    let off = (c.dev.start / esz) as u64;
                    let count = (c.dev.len() / esz) as u32;
                    let mut launch = self.stream.launch_builder(&func);
                    launch.arg(&dst_ptr).arg(&src_ptr).arg(&off).arg(&count);
                    // SAFETY: the kernel takes (T*, const T*, u64, u32);
                    // `dst` holds at least `off + count` elements (the range
                    // was checked against its length) and the scratch buffer
                    // holds `count` elements of this chunk.
                    unsafe { launch.launch(LaunchConfig::for_num_elems(count)) }
                        .map_err(|e| self.err("kernel launch", e))?;
                    drop(src_sync);
                    slot.done
                        .record(&self.stream)
                        .map_err(|e| self.err("kernel launch", e))?;
                    ring[c.slot] = Some(slot);
                }
            }
            if cur.is_some() || plan.next().is_some() {
                return Err(self.err("upload", "input ended before the plan"));
            }
            // Bytes beyond the range that are already queued are an error
            // (without waiting: the sender may keep its end open).
            if input.try_recv().is_ok_and(|b| !b.is_empty()) {
                return Err(gpu_err("more bytes arrived than the range holds"));
            }
            Ok(())
        }
        .await;
        drop(dst_sync);
        // Done when the device has applied every chunk; the slots go back
        // to the pool only then.
        let mut slots: Vec<UpSlot> = ring.into_iter().flatten().collect();
        slots.extend(cur.map(|(_, s, _)| s));
        // The last chunk's kernel finishes last: wait for it (polling
        // briefly), then for the rest, which are done by then.
        if res.is_ok() && !slots.is_empty() {
            let tail = self
                .stream
                .record_event(Some(CUevent_flags::CU_EVENT_BLOCKING_SYNC))
                .map_err(|e| self.err("reduce", e))?;
            self.settled(tail, |e| e).await?;
        }
        let (slots, settled) =
            blocking(slots, |ss| ss.iter().try_for_each(|s| s.done.synchronize())).await?;
        if settled.is_ok() {
            lock(&self.ups).extend(slots);
        }
        res.and(settled.map_err(|e| self.err("reduce", e)))
    }

    /// `slot` once the work recorded in its event has completed: at once
    /// when it already has (the common case), else after waiting on the
    /// blocking pool.
    async fn settled<S: Send + 'static>(&self, slot: S, event: fn(&S) -> &CudaEvent) -> Result<S> {
        // Poll briefly first, yielding to the rank's other tasks (a
        // chunk's copy takes tens to hundreds of microseconds, less than a
        // trip through the blocking pool and a sleeping wait costs).
        let spin = std::time::Instant::now();
        loop {
            match event(&slot).try_is_complete() {
                Ok(true) => return Ok(slot),
                Ok(false) if spin.elapsed() < SPIN => tokio::task::yield_now().await,
                Ok(false) => break,
                Err(e) => return Err(self.err("waiting for the device", e)),
            }
        }
        let (slot, r) = blocking(slot, move |s| event(s).synchronize()).await?;
        r.map_err(|e| self.err("waiting for the device", e))?;
        Ok(slot)
    }

    /// `dst[at..at + n] = src[from..from + n]` on the stream.
    fn copy<T: CudaElement>(
        &self,
        dst: &CudaSlice<T>,
        at: usize,
        src: &CudaSlice<T>,
        from: usize,
        n: usize,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let func = self.function(T::DTYPE, None)?;
        let (dst_ptr, _d) = dst.device_ptr(&self.stream);
        let (src_base, _s) = src.device_ptr(&self.stream);
        // The kernel counts elements in a u32: copy in pieces.
        const PIECE: usize = 1 << 30;
        let mut done = 0;
        while done < n {
            let k = (n - done).min(PIECE);
            let src_ptr = src_base + ((from + done) * std::mem::size_of::<T>()) as u64;
            let (off, count) = ((at + done) as u64, k as u32);
            let mut launch = self.stream.launch_builder(&func);
            launch.arg(&dst_ptr).arg(&src_ptr).arg(&off).arg(&count);
            // SAFETY: the copy kernel takes (T*, const T*, u64, u32); the
            // callers checked both ranges against the buffers' lengths, and
            // this piece lies within them.
            unsafe { launch.launch(LaunchConfig::for_num_elems(count)) }
                .map_err(|e| self.err("copy kernel", e))?;
            done += k;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cuda")
            .field("device", &self.shared.name)
            .field("chunk_bytes", &self.shared.chunk)
            .field("ring", &self.shared.ring)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::kernels::{kernels_source, DTYPES};
    use super::*;

    #[test]
    fn every_kernel_is_generated_once() {
        let src = kernels_source();
        for d in DTYPES {
            for op in [
                None,
                Some(ReduceOp::Sum),
                Some(ReduceOp::Prod),
                Some(ReduceOp::Min),
                Some(ReduceOp::Max),
            ] {
                let name = format!("void {}(", kernel_name(d, op));
                assert_eq!(src.matches(&name).count(), 1, "{name}");
            }
        }
        // Signed integers wrap through their unsigned type.
        assert!(src.contains("(int)((unsigned int)a + (unsigned int)b)"));
    }

    #[test]
    fn no_driver_is_an_error_not_a_panic() {
        // On a host with a driver this opens a device instead.
        match Cuda::new(CudaOptions::default()) {
            Ok(c) => assert!(c.name().starts_with("cuda")),
            Err(e) => assert!(e.to_string().contains("CUDA") || e.to_string().contains("cuda")),
        }
    }

    /// The kernel source compiles with NVRTC (no GPU needed). Without an
    /// NVRTC on this machine it says so and checks nothing more; the
    /// hardware check (scripts/gpu-check.sh) compiles them on a GPU host.
    #[test]
    fn the_kernels_compile_with_nvrtc_where_it_is_installed() {
        let env = |k: &str| std::env::var(k).ok();
        if let Some(p) = env("RANKMESH_NVRTC") {
            // Named explicitly (CI does): it must load.
            if let Err(e) = Nvrtc::open(std::path::Path::new(&p)) {
                panic!("RANKMESH_NVRTC={p} does not load: {e}");
            }
        }
        let Some(nvrtc) = candidates(&env).iter().find_map(|p| Nvrtc::open(p).ok()) else {
            println!("no NVRTC found: the kernel source is not compiled here");
            return;
        };
        println!(
            "compiling the kernels with {} (NVRTC {}.{})",
            nvrtc.path.display(),
            nvrtc.version.0,
            nvrtc.version.1
        );
        let ptx = nvrtc
            .compile(&kernels_source())
            .unwrap_or_else(|e| panic!("{}: {e}", nvrtc.path.display()));
        for d in DTYPES {
            for op in [None, Some(ReduceOp::Sum), Some(ReduceOp::Max)] {
                let name = kernel_name(d, op);
                assert!(
                    ptx.contains(&format!(".entry {name}(")),
                    "{name} missing from the PTX"
                );
            }
        }
        // A compile error carries NVRTC's log.
        let e = nvrtc.compile("this is not CUDA").unwrap_err();
        assert!(e.to_string().contains("nvrtcCompileProgram"), "{e}");
    }
}
