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

use super::nvrtc::{candidates, Nvrtc};
use super::{
    byte_range, check_range, copy_source, exact_sides, gpu_err, staging_plan, DeviceBuffer,
    StagedCopy,
};
use crate::boxfut::BoxFut;
use crate::datatype::{DType, Element, ReduceOp};
use crate::Result;
use bytes::Bytes;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, DevicePtr,
    DeviceRepr, LaunchConfig, PinnedHostSlice, PushKernelArg, ValidAsZeroBits,
};
use std::any::Any;
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

/// C type, and the unsigned type integer arithmetic wraps in. The 16-bit
/// floats travel as their bits (`unsigned short`) and are widened to
/// `float` for the arithmetic, like the host path.
fn c_types(d: DType) -> Option<(&'static str, &'static str)> {
    match d {
        DType::F32 => Some(("float", "float")),
        DType::F64 => Some(("double", "double")),
        DType::I32 => Some(("int", "unsigned int")),
        DType::U32 => Some(("unsigned int", "unsigned int")),
        DType::I64 => Some(("long long", "unsigned long long")),
        DType::U64 => Some(("unsigned long long", "unsigned long long")),
        DType::F16 | DType::BF16 => Some(("unsigned short", "unsigned short")),
        _ => None,
    }
}

const DTYPES: [DType; 8] = [
    DType::F32,
    DType::F64,
    DType::I32,
    DType::U32,
    DType::I64,
    DType::U64,
    DType::F16,
    DType::BF16,
];

fn kernel_name(d: DType, op: Option<ReduceOp>) -> String {
    let op = match op {
        None => "copy",
        Some(ReduceOp::Sum) => "sum",
        Some(ReduceOp::Prod) => "prod",
        Some(ReduceOp::Min) => "min",
        Some(ReduceOp::Max) => "max",
    };
    format!("rankmesh_{}_{op}", format!("{d:?}").to_lowercase())
}

/// Conversions of the 16-bit floats, without NVRTC's headers: f16 with
/// the PTX conversion instructions (round to nearest even), bf16 by bits
/// (widening is a shift; narrowing rounds to nearest even and keeps NaN a
/// quiet NaN, as the `half` crate does on the host).
const HALF_HELPERS: &str = r#"
__device__ __forceinline__ float rm_f16_to_f32(unsigned short h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ unsigned short rm_f32_to_f16(float f) {
    unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
__device__ __forceinline__ float rm_bf16_to_f32(unsigned short h) {
    return __uint_as_float(((unsigned int)h) << 16);
}
__device__ __forceinline__ unsigned short rm_f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
"#;

/// `dst[off + i] = dst[off + i] op src[i]` (or `= src[i]`) for `i < n`,
/// for every element type and op. Integers wrap like the host kernels
/// (computed unsigned: signed overflow is undefined in C); float min/max
/// ignore a NaN operand like Rust's `f32::min`; f16 and bf16 are combined
/// in f32 and rounded once, like the host path.
fn kernels_source() -> String {
    let mut s = String::from(HALF_HELPERS);
    for d in DTYPES {
        let Some((t, u)) = c_types(d) else { continue };
        let half = match d {
            DType::F16 => Some("f16"),
            DType::BF16 => Some("bf16"),
            _ => None,
        };
        let float = matches!(d, DType::F32 | DType::F64) || half.is_some();
        let ops: [(Option<ReduceOp>, String); 5] = [
            (None, "b".into()),
            (
                Some(ReduceOp::Sum),
                if float {
                    "a + b".into()
                } else {
                    format!("({t})(({u})a + ({u})b)")
                },
            ),
            (
                Some(ReduceOp::Prod),
                if float {
                    "a * b".into()
                } else {
                    format!("({t})(({u})a * ({u})b)")
                },
            ),
            (
                Some(ReduceOp::Min),
                match d {
                    DType::F64 => "fmin(a, b)".into(),
                    _ if float => "fminf(a, b)".into(),
                    _ => "(b < a ? b : a)".into(),
                },
            ),
            (
                Some(ReduceOp::Max),
                match d {
                    DType::F64 => "fmax(a, b)".into(),
                    _ if float => "fmaxf(a, b)".into(),
                    _ => "(b > a ? b : a)".into(),
                },
            ),
        ];
        for (op, expr) in ops {
            let body = match (half, op) {
                // A copy moves the bits as they are.
                (Some(_), None) | (None, _) => format!(
                    "    {t} a = dst[off + i];\n    {t} b = src[i];\n    (void)a;\n    \
                     dst[off + i] = {expr};\n"
                ),
                (Some(h), Some(_)) => format!(
                    "    float a = rm_{h}_to_f32(dst[off + i]);\n    \
                     float b = rm_{h}_to_f32(src[i]);\n    \
                     dst[off + i] = rm_f32_to_{h}({expr});\n"
                ),
            };
            s.push_str(&format!(
                "extern \"C\" __global__ void {name}({t}* dst, const {t}* src, \
                 unsigned long long off, unsigned int n) {{\n\
                 \x20   unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;\n\
                 \x20   if (i >= n) return;\n\
                 {body}}}\n",
                name = kernel_name(d, op)
            ));
        }
    }
    s
}

/// The kernels' PTX, compiled once per process by the first NVRTC whose
/// output a device accepted (and that library, kept loaded).
static PTX: OnceLock<(String, Nvrtc)> = OnceLock::new();

/// Compile the kernels with the first NVRTC that works for `ctx` and load
/// them. Tries every candidate library (see `nvrtc.rs`): one that is
/// missing, fails to compile, or emits PTX this driver cannot load (a
/// newer CUDA than the driver's) is skipped, and the error lists them all.
fn load_kernels(ctx: &Arc<CudaContext>) -> Result<Arc<CudaModule>> {
    if let Some((ptx, _)) = PTX.get() {
        return ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx.clone()))
            .map_err(|e| gpu_err(format!("CUDA module load: {e}")));
    }
    let src = kernels_source();
    let env = |k: &str| std::env::var(k).ok();
    let mut tried: Vec<String> = Vec::new();
    let mut found_any = false;
    for path in candidates(&env) {
        let nvrtc = match Nvrtc::open(&path) {
            Ok(n) => n,
            Err(e) => {
                // Bare names the loader does not know are the normal case.
                if path.is_absolute() {
                    tried.push(e);
                }
                continue;
            }
        };
        found_any = true;
        let label = format!(
            "{} (NVRTC {}.{})",
            nvrtc.path.display(),
            nvrtc.version.0,
            nvrtc.version.1
        );
        let ptx = match nvrtc.compile(&src) {
            Ok(p) => p,
            Err(e) => {
                tried.push(format!("{label}: {e}"));
                continue;
            }
        };
        match ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx.clone())) {
            Ok(m) => {
                tracing::debug!("CUDA kernels compiled with {label}");
                let _ = PTX.set((ptx, nvrtc));
                return Ok(m);
            }
            Err(e) => tried.push(format!("{label}: the driver rejected its PTX: {e}")),
        }
    }
    if !found_any {
        return Err(gpu_err(
            "the CUDA driver is present but NVRTC (libnvrtc) is not: rankmesh compiles its \
             kernels with it. Install the CUDA runtime compiler (Debian/Ubuntu: cuda-nvrtc-12-x \
             or cuda-nvrtc-13-x; pip: nvidia-cuda-nvrtc-cu12), or set RANKMESH_NVRTC to the \
             path of libnvrtc.so",
        ));
    }
    Err(gpu_err(format!(
        "CUDA kernel compilation: no NVRTC worked with this driver; tried: {}. Install an \
         NVRTC no newer than the driver's CUDA version, or set RANKMESH_NVRTC to one",
        tried.join("; ")
    )))
}

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

/// A staging slot for copies to the device: pinned host memory (write-
/// combined: the host only writes it), the device scratch the reduce kernel
/// reads, and the event recorded after the slot's last kernel.
struct UpSlot {
    pinned: PinnedHostSlice<u8>,
    scratch: CudaSlice<u8>,
    done: CudaEvent,
}

/// A staging slot for copies to the host: pinned host memory and the event
/// recorded after the slot's last copy.
struct DownSlot {
    pinned: PinnedHostSlice<u8>,
    done: CudaEvent,
}

// A slot's pinned memory must outlive the copies queued into or out of it:
// a slot dropped on an error path first waits for its last one.
impl Drop for UpSlot {
    fn drop(&mut self) {
        let _ = self.done.synchronize();
    }
}

impl Drop for DownSlot {
    fn drop(&mut self) {
        let _ = self.done.synchronize();
    }
}

/// A downloaded chunk handed to the network layer without copying: the
/// bytes stay in the pinned slot, which goes back to the pool when the last
/// `Bytes` referring to it is dropped.
struct StagedChunk {
    slot: Option<DownSlot>,
    data: &'static [u8],
    pool: Arc<Mutex<Vec<DownSlot>>>,
}

impl AsRef<[u8]> for StagedChunk {
    fn as_ref(&self) -> &[u8] {
        self.data
    }
}

impl Drop for StagedChunk {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            lock(&self.pool).push(slot);
        }
    }
}

impl StagedChunk {
    /// The first `n` bytes of `slot`, whose copy has completed.
    fn new(slot: DownSlot, n: usize, pool: Arc<Mutex<Vec<DownSlot>>>) -> Result<StagedChunk> {
        let bytes = slot
            .pinned
            .as_slice()
            .map_err(|e| gpu_err(format!("staged chunk: {e}")))?;
        let bytes = bytes
            .get(..n)
            .ok_or_else(|| gpu_err(format!("staged chunk: {n} bytes from a smaller slot")))?;
        // SAFETY: the slice points into the pinned allocation owned by
        // `slot`, which this value owns until it is dropped and which is
        // neither freed nor written before then (it returns to the pool only
        // in `drop`, and the device's copy into it completed before this was
        // built). The `'static` lifetime never escapes: `as_ref` hands out
        // a borrow of `self`, and `Bytes::from_owner` keeps `self` alive
        // while any `Bytes` uses the data.
        let data: &'static [u8] = unsafe { std::slice::from_raw_parts(bytes.as_ptr(), n) };
        Ok(StagedChunk {
            slot: Some(slot),
            data,
            pool,
        })
    }
}

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

/// A typed array in CUDA device memory, usable with the `*_device`
/// collectives of `Communicator`.
pub struct CudaBuffer<T: CudaElement> {
    cuda: Cuda,
    slice: CudaSlice<T>,
    len: usize,
}

impl<T: CudaElement> CudaBuffer<T> {
    /// A zero-filled buffer of `len` elements.
    pub fn zeroed(cuda: &Cuda, len: usize) -> Result<Self> {
        let slice = cuda
            .shared
            .stream
            .alloc_zeros::<T>(len.max(1))
            .map_err(|e| cuda.shared.err("allocation", e))?;
        Ok(CudaBuffer {
            cuda: cuda.clone(),
            slice,
            len,
        })
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(cuda: &Cuda, data: &[T]) -> Result<Self> {
        let mut b = Self::zeroed(cuda, data.len())?;
        if !data.is_empty() {
            let mut head = b.slice.slice_mut(..data.len());
            cuda.shared
                .stream
                .memcpy_htod(data, &mut head)
                .map_err(|e| cuda.shared.err("copy to device", e))?;
        }
        Ok(b)
    }

    /// Wrap an application's slice (allocated in `cuda`'s context).
    pub fn from_cuda_slice(cuda: &Cuda, slice: CudaSlice<T>) -> Result<Self> {
        if slice.context() != &cuda.shared.ctx {
            return Err(gpu_err(format!(
                "the slice belongs to another CUDA context than {}",
                cuda.name()
            )));
        }
        let len = slice.len();
        Ok(CudaBuffer {
            cuda: cuda.clone(),
            slice,
            len,
        })
    }

    /// The underlying cudarc slice.
    pub fn slice(&self) -> &CudaSlice<T> {
        &self.slice
    }

    /// The underlying cudarc slice, to give back to the application.
    pub fn into_inner(self) -> CudaSlice<T> {
        self.slice
    }

    /// Copy `data` into the elements starting at `at` (queued on the
    /// collectives' stream, so later collectives see it).
    pub fn write(&mut self, at: usize, data: &[T]) -> Result<()> {
        check_range("write", &(at..at + data.len()), self.len)?;
        if data.is_empty() {
            return Ok(());
        }
        let s = &self.cuda.shared;
        let mut part = self
            .slice
            .try_slice_mut(at..at + data.len())
            .ok_or_else(|| s.err("write", "range outside the buffer"))?;
        // `part` holds exactly `data.len()` elements: the copy moves all of
        // `data` and nothing more.
        s.stream
            .memcpy_htod(data, &mut part)
            .map_err(|e| s.err("copy to device", e))
    }

    /// Copy the buffer's contents to the host.
    pub async fn to_vec(&self) -> Result<Vec<T>> {
        if self.len == 0 {
            return Ok(Vec::new());
        }
        let s = &self.cuda.shared;
        let mut out = vec![T::zeroed(); self.len];
        s.stream
            .memcpy_dtoh(&self.slice.slice(..self.len), &mut out)
            .map_err(|e| s.err("copy to host", e))?;
        s.synchronize().await?;
        Ok(out)
    }
}

impl<T: CudaElement> DeviceBuffer for CudaBuffer<T> {
    fn dtype(&self) -> DType {
        T::DTYPE
    }

    fn len(&self) -> usize {
        self.len
    }

    fn describe(&self) -> String {
        self.cuda.shared.name.clone()
    }

    fn download(&self, range: Range<usize>, out: mpsc::Sender<Bytes>) -> BoxFut<'_, Result<()>> {
        Box::pin(async move {
            let bytes = byte_range("download", &range, self.len, std::mem::size_of::<T>())?;
            self.cuda.shared.download(&self.slice, bytes, out).await
        })
    }

    fn upload(
        &self,
        range: Range<usize>,
        op: Option<ReduceOp>,
        input: mpsc::Receiver<Bytes>,
    ) -> BoxFut<'_, Result<()>> {
        Box::pin(async move {
            let bytes = byte_range("upload", &range, self.len, std::mem::size_of::<T>())?;
            self.cuda.shared.upload(&self.slice, bytes, op, input).await
        })
    }

    fn duplicate(&self, range: Range<usize>) -> Result<Box<dyn DeviceBuffer>> {
        check_range("duplicate", &range, self.len)?;
        let copy = CudaBuffer::<T>::zeroed(&self.cuda, range.len())?;
        copy.copy_from(self, range, 0)?;
        Ok(Box::new(copy))
    }

    fn copy_from(&self, src: &dyn DeviceBuffer, range: Range<usize>, at: usize) -> Result<()> {
        let src = copy_source::<CudaBuffer<T>>(self, src, &range, at)?;
        if !Arc::ptr_eq(&src.cuda.shared, &self.cuda.shared) {
            return Err(gpu_err(
                "cannot copy between buffers of two different CUDA devices",
            ));
        }
        self.cuda
            .shared
            .copy(&self.slice, at, &src.slice, range.start, range.len())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl<T: CudaElement> std::fmt::Debug for CudaBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBuffer")
            .field("device", &self.cuda.shared.name)
            .field("len", &self.len)
            .finish()
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
        assert!(e.contains("nvrtcCompileProgram"), "{e}");
    }
}
