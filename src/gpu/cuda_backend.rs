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

use super::{byte_range, check_range, concat_into, copy_source, gpu_err, DeviceBuffer, Packer};
use crate::datatype::{DType, Element, ReduceOp};
use crate::transport::BoxFut;
use crate::Result;
use bytes::Bytes;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    LaunchConfig, PinnedHostSlice, PushKernelArg, ValidAsZeroBits,
};
use std::any::Any;
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::mpsc;

/// Element types the CUDA backend reduces.
pub trait CudaElement: Element + DeviceRepr + ValidAsZeroBits {}
impl CudaElement for f32 {}
impl CudaElement for f64 {}
impl CudaElement for i32 {}
impl CudaElement for u32 {}
impl CudaElement for i64 {}
impl CudaElement for u64 {}

/// C type, and the unsigned type integer arithmetic wraps in.
fn c_types(d: DType) -> Option<(&'static str, &'static str)> {
    match d {
        DType::F32 => Some(("float", "float")),
        DType::F64 => Some(("double", "double")),
        DType::I32 => Some(("int", "unsigned int")),
        DType::U32 => Some(("unsigned int", "unsigned int")),
        DType::I64 => Some(("long long", "unsigned long long")),
        DType::U64 => Some(("unsigned long long", "unsigned long long")),
        _ => None,
    }
}

const DTYPES: [DType; 6] = [
    DType::F32,
    DType::F64,
    DType::I32,
    DType::U32,
    DType::I64,
    DType::U64,
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

/// `dst[off + i] = dst[off + i] op src[i]` (or `= src[i]`) for `i < n`,
/// for every element type and op. Integers wrap like the host kernels
/// (computed unsigned: signed overflow is undefined in C); float min/max
/// ignore a NaN operand like Rust's `f32::min`.
fn kernels_source() -> String {
    let mut s = String::new();
    for d in DTYPES {
        let Some((t, u)) = c_types(d) else { continue };
        let float = matches!(d, DType::F32 | DType::F64);
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
                    DType::F32 => "fminf(a, b)".into(),
                    DType::F64 => "fmin(a, b)".into(),
                    _ => "(b < a ? b : a)".into(),
                },
            ),
            (
                Some(ReduceOp::Max),
                match d {
                    DType::F32 => "fmaxf(a, b)".into(),
                    DType::F64 => "fmax(a, b)".into(),
                    _ => "(b > a ? b : a)".into(),
                },
            ),
        ];
        for (op, expr) in ops {
            s.push_str(&format!(
                "extern \"C\" __global__ void {name}({t}* dst, const {t}* src, \
                 unsigned long long off, unsigned int n) {{\n\
                 \x20   unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;\n\
                 \x20   if (i >= n) return;\n\
                 \x20   {t} a = dst[off + i];\n\
                 \x20   {t} b = src[i];\n\
                 \x20   (void)a;\n\
                 \x20   dst[off + i] = {expr};\n\
                 }}\n",
                name = kernel_name(d, op)
            ));
        }
    }
    s
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
            ring: super::DEFAULT_RING,
        }
    }
}

/// A CUDA device prepared for collectives: a stream, the compiled kernels
/// and staging pools. Cheap to clone.
#[derive(Clone)]
pub struct Cuda {
    shared: Arc<Shared>,
}

struct Shared {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
    name: String,
    chunk: usize,
    ring: usize,
    ups: Mutex<Vec<UpSlot>>,
    downs: Mutex<Vec<PinnedHostSlice<u8>>>,
}

struct UpSlot {
    pinned: PinnedHostSlice<u8>,
    scratch: CudaSlice<u8>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Cuda {
    /// Open the device this process should use (see
    /// [`CudaOptions::device`]) and compile the kernels. Without a CUDA
    /// driver or NVRTC this is an error saying so, not a panic.
    pub fn new(opts: CudaOptions) -> Result<Cuda> {
        // SAFETY: only tries to load the driver library by its usual names.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(gpu_err(
                "no CUDA driver found (libcuda could not be loaded); use a host with an NVIDIA \
                 driver, or the wgpu backend",
            ));
        }
        // SAFETY: as above, for the NVRTC library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(gpu_err(
                "the CUDA driver is present but NVRTC (libnvrtc) is not; install the CUDA \
                 runtime compiler library (cuda-nvrtc) so rankmesh can compile its kernels",
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
        let ptx = cudarc::nvrtc::compile_ptx(kernels_source())
            .map_err(|e| fail("kernel compilation (NVRTC)", &e))?;
        let module = ctx.load_module(ptx).map_err(|e| fail("module load", &e))?;
        let dev = ctx.name().unwrap_or_else(|_| format!("device {ordinal}"));
        Ok(Cuda {
            shared: Arc::new(Shared {
                ctx,
                stream,
                module,
                name: format!("cuda ({dev})"),
                chunk: opts.chunk_bytes.max(256) / 8 * 8,
                ring: opts.ring.max(1),
                ups: Mutex::default(),
                downs: Mutex::default(),
            }),
        })
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.shared.ctx
    }

    /// The stream collectives run on. Work the application queued on
    /// other streams is waited for through cudarc's event tracking.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.shared.stream
    }

    /// Device name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Wait until everything queued on the stream has executed.
    pub async fn synchronize(&self) -> Result<()> {
        self.shared.synchronize().await
    }
}

impl Shared {
    fn err(&self, what: &str, e: impl std::fmt::Display) -> crate::Error {
        gpu_err(format!("{}: {what}: {e}", self.name))
    }

    async fn synchronize(&self) -> Result<()> {
        let stream = self.stream.clone();
        tokio::task::spawn_blocking(move || stream.synchronize())
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
        Ok(UpSlot { pinned, scratch })
    }

    fn down_slot(&self) -> Result<PinnedHostSlice<u8>> {
        if let Some(s) = lock(&self.downs).pop() {
            return Ok(s);
        }
        // SAFETY: the contents are unset; every use copies into it first.
        // Not write-combined: the host reads these.
        unsafe { self.ctx.alloc_pinned_with_flags::<u8>(self.chunk, 0) }
            .map_err(|e| self.err("pinned allocation", e))
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
        let mut next = bytes.start;
        let mut inflight: VecDeque<(PinnedHostSlice<u8>, usize)> = VecDeque::new();
        loop {
            while inflight.len() < self.ring && next < bytes.end {
                let n = (bytes.end - next).min(self.chunk);
                let mut slot = self.down_slot()?;
                self.stream
                    .memcpy_dtoh(&view.slice(next..next + n), &mut slot)
                    .map_err(|e| self.err("copy to host", e))?;
                inflight.push_back((slot, n));
                next += n;
            }
            let Some((slot, n)) = inflight.pop_front() else {
                return Ok(());
            };
            // Reading the slot waits for its copy.
            let (slot, chunk) = tokio::task::spawn_blocking(move || {
                let c = slot.as_slice().map(|s| Bytes::copy_from_slice(&s[..n]));
                (slot, c)
            })
            .await
            .map_err(|e| self.err("copy to host", e))?;
            let chunk = chunk.map_err(|e| self.err("copy to host", e))?;
            lock(&self.downs).push(slot);
            if out.send(chunk).await.is_err() {
                return Ok(());
            }
        }
    }

    async fn upload<T: CudaElement>(
        &self,
        dst: &CudaSlice<T>,
        bytes: Range<usize>,
        op: Option<ReduceOp>,
        input: mpsc::Receiver<Bytes>,
    ) -> Result<()> {
        let func = self.function(T::DTYPE, op)?;
        let esz = std::mem::size_of::<T>();
        let mut packer = Packer::new(input, bytes.len(), self.chunk / esz * esz);
        let mut ring: Vec<Option<UpSlot>> = (0..self.ring).map(|_| None).collect();
        let mut turn = 0;
        let mut pieces = Vec::new();
        let mut at = bytes.start;
        let (dst_ptr, dst_sync) = dst.device_ptr(&self.stream);
        let res = async {
            while let Some(n) = packer.next(&mut pieces).await? {
                let k = turn % ring.len();
                turn += 1;
                let mut slot = match ring[k].take() {
                    Some(s) => s,
                    None => self.up_slot()?,
                };
                let data = std::mem::take(&mut pieces);
                // Writing the slot waits until its previous copy is done.
                let mut slot = tokio::task::spawn_blocking(move || {
                    let r = slot.pinned.as_mut_slice().map(|buf| {
                        concat_into(&data, |o, p| buf[o..o + p.len()].copy_from_slice(p));
                    });
                    r.map(|()| slot)
                })
                .await
                .map_err(|e| self.err("staging", e))?
                .map_err(|e| self.err("staging", e))?;
                self.stream
                    .memcpy_htod(&slot.pinned, &mut slot.scratch)
                    .map_err(|e| self.err("copy to device", e))?;
                let (src_ptr, src_sync) = slot.scratch.device_ptr(&self.stream);
                let off = (at / esz) as u64;
                let count = (n / esz) as u32;
                let mut launch = self.stream.launch_builder(&func);
                launch.arg(&dst_ptr).arg(&src_ptr).arg(&off).arg(&count);
                // SAFETY: the kernel takes (T*, const T*, u64, u32); `dst`
                // holds at least `off + count` elements (the range was
                // checked against its length) and the scratch buffer holds
                // `count` elements of this chunk.
                unsafe { launch.launch(LaunchConfig::for_num_elems(count)) }
                    .map_err(|e| self.err("kernel launch", e))?;
                drop(src_sync);
                ring[k] = Some(slot);
                at += n;
            }
            Ok(())
        }
        .await;
        drop(dst_sync);
        let settled = self.synchronize().await;
        lock(&self.ups).extend(ring.into_iter().flatten());
        res.and(settled)
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
}
