//! [`CudaBuffer`]: a typed device allocation that collectives read and write
//! in place.

use super::*;
use std::future::Future;

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

impl<T: CudaElement> Resident for CudaBuffer<T> {
    const BACKEND: &'static str = "CUDA";
    const BACKEND_TYPE: &'static str = "Cuda";
    const DTYPE: DType = T::DTYPE;

    fn elements(&self) -> usize {
        self.len
    }

    fn device_name(&self) -> &str {
        &self.cuda.shared.name
    }

    fn same_device(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.cuda.shared, &other.cuda.shared)
    }

    fn zeroed_like(&self, len: usize) -> Result<Self> {
        CudaBuffer::zeroed(&self.cuda, len)
    }

    fn download_bytes(
        &self,
        bytes: Range<usize>,
        out: mpsc::Sender<Bytes>,
    ) -> impl Future<Output = Result<()>> + Send + '_ {
        self.cuda.shared.download(&self.slice, bytes, out)
    }

    fn upload_bytes(
        &self,
        bytes: Range<usize>,
        op: Option<ReduceOp>,
        input: mpsc::Receiver<Bytes>,
    ) -> impl Future<Output = Result<()>> + Send + '_ {
        self.cuda.shared.upload(&self.slice, bytes, op, input)
    }

    fn copy_on_device(&self, src: &Self, range: Range<usize>, at: usize) -> Result<()> {
        self.cuda
            .shared
            .copy(&self.slice, at, &src.slice, range.start, range.len())
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
