//! Where collbench's buffers live: host memory, or a GPU through one of
//! rankmesh's device backends (`--device wgpu|cuda`, each present only
//! when collbench was built with the feature of the same name).

use crate::args::{Args, Coll, DeviceKind, Dtype};
#[cfg(any(feature = "wgpu", feature = "cuda"))]
use rankmesh::gpu::BoxFut;
use rankmesh::gpu::DeviceBuffer;
use rankmesh::{Element, Error, Result};

/// The open device of this rank.
pub enum Device {
    Host,
    #[cfg(feature = "wgpu")]
    Wgpu(rankmesh::gpu::Wgpu),
    #[cfg(feature = "cuda")]
    Cuda(rankmesh::gpu::Cuda),
}

/// A benchmark buffer in device memory, whatever its element type.
pub trait Staged: Send + Sync {
    fn buf(&self) -> &dyn DeviceBuffer;
    fn buf_mut(&mut self) -> &mut dyn DeviceBuffer;
    /// Overwrite the buffer with `bytes` (its elements' bytes) and wait
    /// until the device holds them.
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    fn load<'a>(&'a mut self, bytes: &'a [u8]) -> BoxFut<'a, Result<()>>;
    /// The buffer's elements' bytes, copied to the host.
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    fn fetch(&self) -> BoxFut<'_, Result<Vec<u8>>>;
}

/// What a build without the feature says for `--device NAME`.
pub fn missing(kind: DeviceKind) -> Option<String> {
    let (name, built) = match kind {
        DeviceKind::Host => return None,
        DeviceKind::Wgpu => ("wgpu", cfg!(feature = "wgpu")),
        DeviceKind::Cuda => ("cuda", cfg!(feature = "cuda")),
    };
    (!built).then(|| {
        format!(
            "--device {name}: this collbench was built without the `{name}` feature; \
             rebuild it with `cargo install --path launcher --features {name}` (or \
             `cargo build -p rankmesh-launcher --features {name}`)"
        )
    })
}

/// Why `coll` cannot run on `kind`'s buffers, if it cannot.
pub fn unsupported(kind: DeviceKind, coll: Coll) -> Option<String> {
    let on_device = matches!(
        coll,
        Coll::Allreduce
            | Coll::Broadcast
            | Coll::Reduce
            | Coll::Allgather
            | Coll::Reducescatter
            | Coll::Barrier
    );
    (kind != DeviceKind::Host && !on_device).then(|| {
        format!(
            "--coll {}: rankmesh has no collective of that kind on device buffers; \
             with --device use allreduce, broadcast, reduce, allgather, reducescatter or barrier",
            coll.name()
        )
    })
}

/// Why `--device kind` cannot hold `-d dtype`, if it cannot.
pub fn no_dtype(kind: DeviceKind, dtype: Dtype) -> Option<String> {
    let (name, has, list): (_, &[Dtype], _) = match kind {
        DeviceKind::Host => return None,
        DeviceKind::Wgpu => (
            "wgpu",
            &[
                Dtype::Float,
                Dtype::Int32,
                Dtype::Uint32,
                Dtype::Half,
                Dtype::Bfloat16,
            ],
            "float, int32, uint32, half, bfloat16",
        ),
        DeviceKind::Cuda => (
            "cuda",
            &[
                Dtype::Float,
                Dtype::Double,
                Dtype::Int32,
                Dtype::Uint32,
                Dtype::Int64,
                Dtype::Uint64,
                Dtype::Half,
                Dtype::Bfloat16,
            ],
            "float, double, int32, uint32, int64, uint64, half, bfloat16",
        ),
    };
    (!has.contains(&dtype)).then(|| {
        format!(
            "-d {}: rankmesh's {name} backend has no buffers of that type; use one of {list}",
            dtype.name()
        )
    })
}

impl Device {
    pub async fn open(a: &Args) -> Result<Device> {
        if let Some(m) = missing(a.device) {
            return Err(Error::Config { detail: m });
        }
        match a.device {
            DeviceKind::Host => Ok(Device::Host),
            #[cfg(feature = "wgpu")]
            DeviceKind::Wgpu => {
                let mut o = rankmesh::gpu::WgpuOptions::default();
                if let Some(c) = a.chunk {
                    o.chunk_bytes = c as usize;
                }
                if let Some(r) = a.ring {
                    o.ring = r;
                }
                Ok(Device::Wgpu(rankmesh::gpu::Wgpu::new(o).await?))
            }
            #[cfg(feature = "cuda")]
            DeviceKind::Cuda => {
                let mut o = rankmesh::gpu::CudaOptions::default();
                if let Some(c) = a.chunk {
                    o.chunk_bytes = c as usize;
                }
                if let Some(r) = a.ring {
                    o.ring = r;
                }
                Ok(Device::Cuda(rankmesh::gpu::Cuda::new(o)?))
            }
            #[allow(unreachable_patterns)]
            _ => Err(Error::Config {
                detail: format!("--device {:?}: not built in", a.device),
            }),
        }
    }

    /// The device, as the table's header names it.
    pub fn name(&self) -> String {
        match self {
            Device::Host => "host memory".into(),
            #[cfg(feature = "wgpu")]
            Device::Wgpu(g) => g.name().to_string(),
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => g.name().to_string(),
        }
    }

    /// A device buffer holding a copy of `data` (`None` on the host).
    pub fn buffer<T: Element>(&self, data: &[T]) -> Result<Option<Box<dyn Staged>>> {
        match self {
            Device::Host => {
                let _ = data;
                Ok(None)
            }
            #[cfg(feature = "wgpu")]
            Device::Wgpu(g) => Ok(Some(copy_as!(
                Wb,
                rankmesh::gpu::WgpuBuffer,
                g,
                data,
                [F32 => f32, I32 => i32, U32 => u32, F16 => half::f16, BF16 => half::bf16]
            ))),
            #[cfg(feature = "cuda")]
            Device::Cuda(g) => Ok(Some(copy_as!(
                Cb,
                rankmesh::gpu::CudaBuffer,
                g,
                data,
                [
                    F32 => f32, F64 => f64, I32 => i32, U32 => u32, I64 => i64,
                    U64 => u64, F16 => half::f16, BF16 => half::bf16
                ]
            ))),
        }
    }
}

/// A device buffer of `$buf` holding `$data` (a `&[T]`), as the backend's
/// element type of `T`'s `DType`, wrapped in `$wrap`.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
macro_rules! copy_as {
    ($wrap:ident, $buf:path, $g:expr, $data:expr, [$($d:ident => $t:ty),* $(,)?]) => {{
        use $buf as B;
        let b: Box<dyn Staged> = match T::DTYPE {
            $(rankmesh::DType::$d => Box::new($wrap($g.clone(), B::<$t>::from_slice($g, cast($data)?)?)),)*
            other => {
                return Err(Error::Config {
                    detail: format!(
                        "-d: this device has no {other:?} buffers (collbench --help lists the types)"
                    ),
                })
            }
        };
        b
    }};
}
#[cfg(any(feature = "wgpu", feature = "cuda"))]
use copy_as;

/// `data` as the backend's element type of the same `DType`.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn cast<T: Element, U: bytemuck::Pod>(data: &[T]) -> Result<&[U]> {
    bytemuck::try_cast_slice(data).map_err(|e| Error::Config {
        detail: format!("collbench: buffer of {:?} elements: {e}", T::DTYPE),
    })
}

/// `bytes` as elements of `U`, copied only when misaligned.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn elems<U: bytemuck::Pod>(bytes: &[u8]) -> std::borrow::Cow<'_, [U]> {
    match bytemuck::try_cast_slice(bytes) {
        Ok(s) => std::borrow::Cow::Borrowed(s),
        Err(_) => std::borrow::Cow::Owned(bytemuck::pod_collect_to_vec(bytes)),
    }
}

/// A backend's typed buffer with its device handle, as a `Staged`.
macro_rules! staged {
    ($feature:literal, $wrap:ident, $gpu:path, $buf:ident, $elem:path) => {
        #[cfg(feature = $feature)]
        struct $wrap<T: $elem>($gpu, rankmesh::gpu::$buf<T>);

        #[cfg(feature = $feature)]
        impl<T: $elem> Staged for $wrap<T> {
            fn buf(&self) -> &dyn DeviceBuffer {
                &self.1
            }
            fn buf_mut(&mut self) -> &mut dyn DeviceBuffer {
                &mut self.1
            }
            fn load<'a>(&'a mut self, bytes: &'a [u8]) -> BoxFut<'a, Result<()>> {
                Box::pin(async move {
                    self.1.write(0, &elems::<T>(bytes))?;
                    self.0.synchronize().await
                })
            }
            fn fetch(&self) -> BoxFut<'_, Result<Vec<u8>>> {
                Box::pin(async move { Ok(bytemuck::cast_slice(&self.1.to_vec().await?).to_vec()) })
            }
        }
    };
}

staged!(
    "wgpu",
    Wb,
    rankmesh::gpu::Wgpu,
    WgpuBuffer,
    rankmesh::gpu::WgpuElement
);
staged!(
    "cuda",
    Cb,
    rankmesh::gpu::Cuda,
    CudaBuffer,
    rankmesh::gpu::CudaElement
);
