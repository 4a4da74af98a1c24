//! [`WgpuBuffer`]: a typed storage buffer on a wgpu device that collectives
//! read and write in place.

use super::*;
use std::future::Future;

/// A typed array in a wgpu buffer, usable with the `*_device`
/// collectives of `Communicator`.
pub struct WgpuBuffer<T> {
    gpu: Wgpu,
    buffer: wgpu::Buffer,
    len: usize,
    _t: PhantomData<fn() -> T>,
}

/// Usages a buffer needs for collectives.
const USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

impl<T: WgpuElement> WgpuBuffer<T> {
    /// A zero-filled buffer of `len` elements.
    pub fn zeroed(gpu: &Wgpu, len: usize) -> Result<Self> {
        let size = len
            .checked_mul(std::mem::size_of::<T>())
            .filter(|&s| up4(s as u64) <= gpu.shared.device.limits().max_buffer_size)
            .ok_or_else(|| {
                gpu_err(format!(
                    "{}: {len} elements exceed the device's largest buffer ({} bytes)",
                    gpu.name(),
                    gpu.shared.device.limits().max_buffer_size
                ))
            })?;
        if T::DTYPE == DType::F16 && !gpu.shared.f16 {
            return Err(gpu_err(format!(
                "{}: the adapter lacks the shader-f16 feature, so f16 buffers cannot be used",
                gpu.name()
            )));
        }
        let buffer = gpu.shared.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("rankmesh buffer"),
            // Whole 4-byte words: copies and bindings move words.
            size: up4(size.max(4) as u64),
            usage: USAGE,
            mapped_at_creation: false,
        });
        Ok(WgpuBuffer {
            gpu: gpu.clone(),
            buffer,
            len,
            _t: PhantomData,
        })
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(gpu: &Wgpu, data: &[T]) -> Result<Self> {
        let b = Self::zeroed(gpu, data.len())?;
        b.write(0, data)?;
        Ok(b)
    }

    fn check_wrapped(gpu: &Wgpu, buffer: &wgpu::Buffer, len: usize) -> Result<()> {
        let need = up4((len as u64).saturating_mul(std::mem::size_of::<T>() as u64));
        if buffer.size() < need {
            return Err(gpu_err(format!(
                "the buffer holds {} bytes, fewer than {len} elements of {:?} need ({need}, \
                 in whole 4-byte words)",
                buffer.size(),
                T::DTYPE
            )));
        }
        if T::DTYPE == DType::F16 && !gpu.shared.f16 {
            return Err(gpu_err(format!(
                "{}: the adapter lacks the shader-f16 feature, so f16 buffers cannot be used",
                gpu.name()
            )));
        }
        Ok(())
    }

    /// Wrap an application's buffer holding `len` elements. It needs the
    /// usages `STORAGE | COPY_SRC | COPY_DST` and must belong to `gpu`'s
    /// device.
    pub fn from_buffer(gpu: &Wgpu, buffer: wgpu::Buffer, len: usize) -> Result<Self> {
        if !buffer.usage().contains(USAGE) {
            return Err(gpu_err(format!(
                "the buffer's usages {:?} lack some of STORAGE | COPY_SRC | COPY_DST, which \
                 collectives need; create it with those usages",
                buffer.usage()
            )));
        }
        Self::check_wrapped(gpu, &buffer, len)?;
        Ok(WgpuBuffer {
            gpu: gpu.clone(),
            buffer,
            len,
            _t: PhantomData,
        })
    }

    /// The underlying wgpu buffer.
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    /// Overwrite elements from `at` with `data` (queued on the device's
    /// queue, so it is ordered before later collectives). Writes move whole
    /// 4-byte words: for 2-byte elements `at` must be even, and so must
    /// `data.len()` unless the write reaches the end of the buffer.
    pub fn write(&self, at: usize, data: &[T]) -> Result<()> {
        check_range("write", &(at..at + data.len()), self.len)?;
        if data.is_empty() {
            return Ok(());
        }
        let esz = std::mem::size_of::<T>();
        let (off, bytes) = (at * esz, std::mem::size_of_val(data));
        let tail = at + data.len() == self.len;
        if off % 4 != 0 || (bytes % 4 != 0 && !tail) {
            return Err(gpu_err(format!(
                "write of {} elements at {at}: writes of {esz}-byte elements must start and \
                 end on 4-byte boundaries (or end at the end of the buffer)",
                data.len()
            )));
        }
        let raw: &[u8] = bytemuck::cast_slice(data);
        let q = &self.gpu.shared.queue;
        if bytes % 4 == 0 {
            q.write_buffer(&self.buffer, off as u64, raw);
        } else {
            // The buffer's size is a whole number of words: pad the tail.
            let mut padded = raw.to_vec();
            padded.resize(up4(bytes as u64) as usize, 0);
            q.write_buffer(&self.buffer, off as u64, &padded);
        }
        Ok(())
    }

    /// Copy the buffer's contents to the host.
    pub async fn to_vec(&self) -> Result<Vec<T>> {
        let mut out = vec![T::zeroed(); self.len];
        let (tx, mut rx) = mpsc::channel(self.gpu.shared.ring);
        let esz = std::mem::size_of::<T>() as u64;
        let dl = self
            .gpu
            .shared
            .download(&self.buffer, 0..self.len as u64 * esz, tx);
        let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut out);
        let collect = async {
            let mut at = 0;
            while let Some(b) = rx.recv().await {
                let end = (at + b.len()).min(dst.len());
                dst[at..end].copy_from_slice(&b[..end - at]);
                at = end;
            }
            at
        };
        let (r, got) = tokio::join!(dl, collect);
        r?;
        if got != self.len * esz as usize {
            return Err(gpu_err(format!(
                "{}: read {got} of {} bytes",
                self.gpu.name(),
                self.len * esz as usize
            )));
        }
        Ok(out)
    }
}

impl<T: WgpuElement> Resident for WgpuBuffer<T> {
    const BACKEND: &'static str = "wgpu";
    const BACKEND_TYPE: &'static str = "Wgpu";
    const DTYPE: DType = T::DTYPE;

    fn elements(&self) -> usize {
        self.len
    }

    fn device_name(&self) -> &str {
        &self.gpu.shared.name
    }

    fn same_device(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.gpu.shared, &other.gpu.shared)
    }

    fn zeroed_like(&self, len: usize) -> Result<Self> {
        WgpuBuffer::zeroed(&self.gpu, len)
    }

    fn download_bytes(
        &self,
        bytes: Range<usize>,
        out: mpsc::Sender<Bytes>,
    ) -> impl Future<Output = Result<()>> + Send + '_ {
        let bytes = bytes.start as u64..bytes.end as u64;
        self.gpu.shared.download(&self.buffer, bytes, out)
    }

    fn upload_bytes(
        &self,
        bytes: Range<usize>,
        op: Option<ReduceOp>,
        input: mpsc::Receiver<Bytes>,
    ) -> impl Future<Output = Result<()>> + Send + '_ {
        let bytes = bytes.start as u64..bytes.end as u64;
        self.gpu
            .shared
            .upload(&self.buffer, T::DTYPE, bytes, op, input)
    }

    fn copy_on_device(&self, src: &Self, range: Range<usize>, at: usize) -> Result<()> {
        let sh = &self.gpu.shared;
        let esz = std::mem::size_of::<T>() as u64;
        let mut enc = sh.device.create_command_encoder(&Default::default());
        if esz.is_multiple_of(4) {
            enc.copy_buffer_to_buffer(
                &src.buffer,
                range.start as u64 * esz,
                &self.buffer,
                at as u64 * esz,
                range.len() as u64 * esz,
            );
            sh.queue.submit([enc.finish()]);
            return sh.check();
        }
        // Smaller elements: the copy shader, a dispatch's worth at a time.
        let pipeline = sh.pipeline(T::DTYPE, None)?;
        let per = u64::from(WORKGROUP) * 65_535 * esz;
        let total = range.len() as u64 * esz;
        let mut done = 0;
        let mut params = Vec::new();
        while done < total {
            let p = sh.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("rankmesh copy params"),
                size: PARAMS,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let apply = Apply {
                dst: &self.buffer,
                dst_at: at as u64 * esz + done,
                src: &src.buffer,
                src_at: range.start as u64 * esz + done,
                bytes: per.min(total - done),
                esz,
            };
            sh.encode_apply(&mut enc, &pipeline, &p, &apply);
            params.push(p);
            done += apply.bytes;
        }
        sh.queue.submit([enc.finish()]);
        sh.check()
    }
}

impl<T> std::fmt::Debug for WgpuBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuBuffer")
            .field("device", &self.gpu.shared.name)
            .field("len", &self.len)
            .finish()
    }
}
