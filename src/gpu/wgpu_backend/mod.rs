//! The wgpu backend: buffers of any wgpu device (Vulkan, Metal; Mesa's
//! lavapipe on a CPU), reduced with WGSL compute shaders.
//!
//! Staging: an upload slot is a `MAP_WRITE | COPY_SRC` buffer (filled
//! while mapped, then copied on the device) plus a `STORAGE` scratch buffer
//! the reduce shader reads; a download slot is a `MAP_READ | COPY_DST`
//! buffer. Slots live in per-device pools and are mapped again as soon as
//! the device is done with them, so a transfer keeps `ring` chunks in
//! flight. A poller thread per device drives wgpu's map callbacks.

mod buffer;
mod poller;
mod shaders;

pub use buffer::WgpuBuffer;
use poller::Poller;
use shaders::{reduce_shader, wgsl_type};

use super::resident::Resident;
use super::{check_range, concat_into, gpu_err, Packer};
use crate::datatype::{DType, Element, ReduceOp};
use crate::Result;
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::marker::PhantomData;
use std::num::NonZeroU64;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use tokio::sync::{mpsc, oneshot};

/// Threads per workgroup of the reduce shaders.
const WORKGROUP: u32 = 256;
/// Largest staged chunk (keeps a dispatch under the 65535-workgroup limit).
const MAX_CHUNK: usize = 16 << 20;

/// Element types the wgpu backend reduces: `f32`, `i32`, `u32`, and
/// `half::f16` on adapters with the `shader-f16` feature.
pub trait WgpuElement: Element {}
impl WgpuElement for f32 {}
impl WgpuElement for i32 {}
impl WgpuElement for u32 {}
impl WgpuElement for half::f16 {}
impl WgpuElement for half::bf16 {}

/// `n` rounded up to a multiple of 4 (wgpu's copy and binding granule).
fn up4(n: u64) -> u64 {
    n.div_ceil(4) * 4
}

/// How to open a device.
#[derive(Clone, Debug)]
pub struct WgpuOptions {
    /// Which adapter (index among hardware adapters, or among software ones
    /// when there is no hardware one). `None`: `RANKMESH_GPU_DEVICE`, else
    /// the process's local rank.
    pub adapter: Option<usize>,
    /// Bytes per staged chunk (rounded down to a multiple of 256, at most
    /// 16 MiB). Memory cost: `2 * ring` chunks per concurrent transfer.
    pub chunk_bytes: usize,
    /// Staging buffers one transfer keeps in flight (at least 1).
    pub ring: usize,
}

impl Default for WgpuOptions {
    fn default() -> Self {
        WgpuOptions {
            adapter: None,
            chunk_bytes: super::DEFAULT_CHUNK_BYTES,
            ring: super::DEFAULT_RING,
        }
    }
}

/// A wgpu device and queue prepared for collectives: compiled reduce
/// pipelines, staging pools, and a thread that completes buffer mappings.
/// Cheap to clone (one device shared).
#[derive(Clone)]
pub struct Wgpu {
    shared: Arc<Shared>,
}

struct Shared {
    /// First, so that it is dropped first: its thread stops polling before
    /// the pools and the device go.
    poller: Poller,
    device: wgpu::Device,
    queue: wgpu::Queue,
    name: String,
    chunk: usize,
    ring: usize,
    /// `min_storage_buffer_offset_alignment`.
    align: u64,
    /// Whether the device has `shader-f16`.
    f16: bool,
    /// Reduce (`Some(op)`) and copy (`None`) pipelines.
    pipelines: Mutex<HashMap<(DType, Option<ReduceOp>), wgpu::ComputePipeline>>,
    ups: Mutex<Vec<UpSlot>>,
    downs: Mutex<Vec<wgpu::Buffer>>,
    /// The first error wgpu reported outside an operation's own checks.
    error: Arc<Mutex<Option<String>>>,
}

struct UpSlot {
    staging: wgpu::Buffer,
    scratch: wgpu::Buffer,
    params: wgpu::Buffer,
    /// Pending re-mapping of `staging`; `None` when it is mapped.
    ready: Option<MapWait>,
}

type MapWait = oneshot::Receiver<std::result::Result<(), wgpu::BufferAsyncError>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The process's one wgpu instance, created on first use and never
/// destroyed.
///
/// Destroying the last Vulkan instance makes the loader unload the driver
/// (`dlclose`). NVIDIA's driver keeps threads of its own running after
/// that, which then execute unmapped code: every test process that created,
/// dropped and re-created a device died with SIGSEGV on an H200. With one
/// instance for the process the driver stays loaded; devices are still
/// created and dropped freely, and elastic rebuilds or libraries that open
/// several devices share it.
fn instance() -> &'static wgpu::Instance {
    static INSTANCE: std::sync::OnceLock<wgpu::Instance> = std::sync::OnceLock::new();
    INSTANCE
        .get_or_init(|| wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle()))
}

impl Wgpu {
    /// Open the device this process should use (see
    /// [`WgpuOptions::adapter`]). Hardware adapters are preferred; a
    /// software one (lavapipe) is used only when there is no other.
    pub async fn new(opts: WgpuOptions) -> Result<Wgpu> {
        let mut adapters = instance().enumerate_adapters(wgpu::Backends::all()).await;
        if adapters.is_empty() {
            return Err(gpu_err(
                "wgpu found no GPU adapter (no Vulkan or Metal device; on Linux without a GPU, \
                 install Mesa's software driver: apt-get install mesa-vulkan-drivers libvulkan1)",
            ));
        }
        let hw = adapters
            .iter()
            .any(|a| a.get_info().device_type != wgpu::DeviceType::Cpu);
        if hw {
            adapters.retain(|a| a.get_info().device_type != wgpu::DeviceType::Cpu);
        }
        let index = match opts.adapter {
            Some(i) => i,
            None => crate::env::gpu_device_index()?,
        } % adapters.len();
        let adapter = adapters.swap_remove(index);
        let info = adapter.get_info();
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("rankmesh"),
                required_features: adapter.features() & wgpu::Features::SHADER_F16,
                required_limits: adapter.limits(),
                ..Default::default()
            })
            .await
            .map_err(|e| gpu_err(format!("opening {} failed: {e}", info.name)))?;
        let error: Arc<Mutex<Option<String>>> = Arc::default();
        let slot = error.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            lock(&slot).get_or_insert_with(|| e.to_string());
        }));
        let slot = error.clone();
        device.set_device_lost_callback(move |_, why| {
            lock(&slot).get_or_insert_with(|| format!("device lost: {why}"));
        });
        let name = format!("wgpu ({}, {:?})", info.name, info.backend);
        Ok(Self::build(device, queue, name, &opts, error))
    }

    /// Use a device the application already has (its buffers can then be
    /// wrapped with [`WgpuBuffer::from_buffer`]). wgpu validation errors go
    /// to the application's own error handler.
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue, opts: WgpuOptions) -> Wgpu {
        Self::build(device, queue, "wgpu".into(), &opts, Arc::default())
    }

    fn build(
        device: wgpu::Device,
        queue: wgpu::Queue,
        name: String,
        opts: &WgpuOptions,
        error: Arc<Mutex<Option<String>>>,
    ) -> Wgpu {
        let align = u64::from(device.limits().min_storage_buffer_offset_alignment).max(4);
        let f16 = device.features().contains(wgpu::Features::SHADER_F16);
        let chunk = (opts.chunk_bytes.clamp(256, MAX_CHUNK)) / 256 * 256;
        Wgpu {
            shared: Arc::new(Shared {
                poller: Poller::start(device.clone()),
                device,
                queue,
                name,
                chunk,
                ring: opts.ring.max(1),
                align,
                f16,
                pipelines: Mutex::default(),
                ups: Mutex::default(),
                downs: Mutex::default(),
                error,
            }),
        }
    }

    /// The wgpu device.
    pub fn device(&self) -> &wgpu::Device {
        &self.shared.device
    }

    /// The wgpu queue (collectives submit to it, so work the application
    /// submitted earlier is ordered before them).
    pub fn queue(&self) -> &wgpu::Queue {
        &self.shared.queue
    }

    /// Adapter name and backend.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Whether `f16` buffers work here (the adapter has `shader-f16`).
    pub fn supports_f16(&self) -> bool {
        self.shared.f16
    }
}

impl Shared {
    fn check(&self) -> Result<()> {
        match lock(&self.error).take() {
            Some(e) => Err(gpu_err(format!("{}: {e}", self.name))),
            None => Ok(()),
        }
    }

    fn pipeline(&self, dtype: DType, op: Option<ReduceOp>) -> Result<wgpu::ComputePipeline> {
        if let Some(p) = lock(&self.pipelines).get(&(dtype, op)) {
            return Ok(p.clone());
        }
        let ty = wgsl_type(dtype)
            .ok_or_else(|| gpu_err(format!("{}: cannot reduce {dtype:?}", self.name)))?;
        if dtype == DType::F16 && !self.f16 {
            return Err(gpu_err(format!(
                "{}: the adapter lacks the shader-f16 feature, so f16 buffers cannot be used",
                self.name
            )));
        }
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some("rankmesh reduce"),
                source: wgpu::ShaderSource::Wgsl(reduce_shader(ty, op).into()),
            });
        let p = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some("rankmesh reduce"),
                layout: None,
                module: &module,
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: None,
            });
        lock(&self.pipelines).insert((dtype, op), p.clone());
        Ok(p)
    }

    fn up_slot(&self) -> UpSlot {
        if let Some(s) = lock(&self.ups).pop() {
            return s;
        }
        let d = &self.device;
        UpSlot {
            staging: d.create_buffer(&wgpu::BufferDescriptor {
                label: Some("rankmesh upload staging"),
                size: self.chunk as u64,
                usage: wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: true,
            }),
            scratch: d.create_buffer(&wgpu::BufferDescriptor {
                label: Some("rankmesh reduce scratch"),
                size: self.chunk as u64,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            params: d.create_buffer(&wgpu::BufferDescriptor {
                label: Some("rankmesh reduce params"),
                size: PARAMS,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            ready: None,
        }
    }

    fn down_slot(&self) -> wgpu::Buffer {
        if let Some(b) = lock(&self.downs).pop() {
            return b;
        }
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("rankmesh download staging"),
            size: self.chunk as u64,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Map `buf[..n]`; the receiver completes once the device is done with
    /// every earlier use of `buf`.
    fn map(&self, buf: &wgpu::Buffer, mode: wgpu::MapMode, n: u64) -> MapWait {
        let (tx, rx) = oneshot::channel();
        let done = self.poller.expect();
        buf.map_async(mode, 0..n, move |r| {
            let _ = tx.send(r);
            done.finish();
        });
        rx
    }

    async fn wait_map(&self, w: MapWait) -> Result<()> {
        let r = w.await;
        self.check()?;
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(gpu_err(format!(
                "{}: mapping a staging buffer: {e}",
                self.name
            ))),
            Err(_) => Err(gpu_err(format!(
                "{}: the device dropped a mapping",
                self.name
            ))),
        }
    }

    /// Wait until everything submitted so far has executed.
    async fn settle(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        let done = self.poller.expect();
        self.queue.on_submitted_work_done(move || {
            let _ = tx.send(());
            done.finish();
        });
        // Make sure a poll runs even when nothing else is pending.
        self.queue.submit([]);
        rx.await
            .map_err(|_| gpu_err(format!("{}: the device stopped", self.name)))?;
        self.check()
    }

    /// Stage `bytes` of `src` to the host. Copies move whole 4-byte words:
    /// a range of 2-byte elements is widened to them and trimmed on the
    /// host.
    async fn download(
        &self,
        src: &wgpu::Buffer,
        bytes: Range<u64>,
        out: mpsc::Sender<Bytes>,
    ) -> Result<()> {
        let (lo, hi) = (bytes.start / 4 * 4, up4(bytes.end));
        let mut next = lo;
        let mut inflight: VecDeque<(wgpu::Buffer, u64, u64, MapWait)> = VecDeque::new();
        loop {
            while inflight.len() < self.ring && next < hi {
                let n = (hi - next).min(self.chunk as u64);
                let slot = self.down_slot();
                let mut enc = self.device.create_command_encoder(&Default::default());
                enc.copy_buffer_to_buffer(src, next, &slot, 0, n);
                self.queue.submit([enc.finish()]);
                let w = self.map(&slot, wgpu::MapMode::Read, n);
                inflight.push_back((slot, next, n, w));
                next += n;
            }
            let Some((slot, from, n, w)) = inflight.pop_front() else {
                return Ok(());
            };
            self.wait_map(w).await?;
            let chunk = {
                let view = slot
                    .get_mapped_range(0..n)
                    .map_err(|e| gpu_err(format!("{}: {e}", self.name)))?;
                let keep = bytes.start.max(from) - from..bytes.end.min(from + n) - from;
                Bytes::copy_from_slice(&view[keep.start as usize..keep.end as usize])
            };
            slot.unmap();
            lock(&self.downs).push(slot);
            if out.send(chunk).await.is_err() {
                return Ok(());
            }
        }
    }

    async fn upload(
        &self,
        dst: &wgpu::Buffer,
        dtype: DType,
        bytes: Range<u64>,
        op: Option<ReduceOp>,
        input: mpsc::Receiver<Bytes>,
    ) -> Result<()> {
        // Copies between buffers move whole 4-byte words, so ranges of
        // 2-byte elements are written by the copy shader instead.
        let pipeline = if op.is_some() || dtype.size() < 4 {
            Some(self.pipeline(dtype, op)?)
        } else {
            None
        };
        let total = (bytes.end - bytes.start) as usize;
        let mut packer = Packer::new(input, total, self.chunk);
        let mut ring: Vec<UpSlot> = Vec::new();
        let mut turn = 0;
        let mut pieces = Vec::new();
        let mut at = bytes.start;
        let res = async {
            while let Some(n) = packer.next(&mut pieces).await? {
                if ring.len() < self.ring {
                    ring.push(self.up_slot());
                }
                let k = turn % ring.len();
                let slot = &mut ring[k];
                turn += 1;
                if let Some(w) = slot.ready.take() {
                    self.wait_map(w).await?;
                }
                let words = up4(n as u64);
                {
                    let mut view = slot
                        .staging
                        .get_mapped_range_mut(0..words)
                        .map_err(|e| gpu_err(format!("{}: {e}", self.name)))?;
                    concat_into(&pieces, |o, p| {
                        view.slice(o..o + p.len()).copy_from_slice(p);
                    });
                }
                slot.staging.unmap();
                let mut enc = self.device.create_command_encoder(&Default::default());
                match &pipeline {
                    None => enc.copy_buffer_to_buffer(&slot.staging, 0, dst, at, n as u64),
                    Some(p) => {
                        enc.copy_buffer_to_buffer(&slot.staging, 0, &slot.scratch, 0, words);
                        let apply = Apply {
                            dst,
                            dst_at: at,
                            src: &slot.scratch,
                            src_at: 0,
                            bytes: n as u64,
                            esz: dtype.size() as u64,
                        };
                        self.encode_apply(&mut enc, p, &slot.params, &apply);
                    }
                }
                self.queue.submit([enc.finish()]);
                slot.ready = Some(self.map(&slot.staging, wgpu::MapMode::Write, self.chunk as u64));
                at += n as u64;
            }
            Ok(())
        }
        .await;
        // Wait until the device has applied every chunk (and the slots are
        // mapped for their next use) before reporting completion.
        let mut settled = Ok(());
        for mut s in ring {
            if let Some(w) = s.ready.take() {
                if let Err(e) = self.wait_map(w).await {
                    settled = settled.and(Err(e));
                    continue;
                }
            }
            lock(&self.ups).push(s);
        }
        res.and(settled).and_then(|()| self.check())
    }

    /// Encode `dst[..] = dst[..] op src[..]` (or `= src[..]`) over the
    /// ranges of `a`. Buffers are bound from aligned offsets; the shader
    /// skips the elements before each range.
    fn encode_apply(
        &self,
        enc: &mut wgpu::CommandEncoder,
        pipeline: &wgpu::ComputePipeline,
        params: &wgpu::Buffer,
        a: &Apply<'_>,
    ) {
        let dst_base = a.dst_at / self.align * self.align;
        let src_base = a.src_at / self.align * self.align;
        let count = (a.bytes / a.esz) as u32;
        let p = [
            ((a.dst_at - dst_base) / a.esz) as u32,
            count,
            ((a.src_at - src_base) / a.esz) as u32,
            0,
        ];
        self.queue.write_buffer(params, 0, bytemuck::cast_slice(&p));
        let binding = |buffer, offset, size: u64| {
            wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer,
                offset,
                size: NonZeroU64::new(size),
            })
        };
        let group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("rankmesh reduce"),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: binding(a.dst, dst_base, up4(a.dst_at - dst_base + a.bytes)),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: binding(a.src, src_base, up4(a.src_at - src_base + a.bytes)),
                },
                wgpu::BindGroupEntry {
                    binding: 2,
                    resource: binding(params, 0, PARAMS),
                },
            ],
        });
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, &group, &[]);
        pass.dispatch_workgroups(count.div_ceil(WORKGROUP), 1, 1);
    }
}

/// One application of a kernel: `bytes` bytes of elements of `esz` bytes,
/// from `src` at byte `src_at` into `dst` at byte `dst_at`.
struct Apply<'a> {
    dst: &'a wgpu::Buffer,
    dst_at: u64,
    src: &'a wgpu::Buffer,
    src_at: u64,
    bytes: u64,
    esz: u64,
}

/// Size of the kernels' parameter block.
const PARAMS: u64 = 16;

impl std::fmt::Debug for Wgpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wgpu")
            .field("device", &self.shared.name)
            .field("chunk_bytes", &self.shared.chunk)
            .field("ring", &self.shared.ring)
            .finish()
    }
}

impl Wgpu {
    /// Wait until all work submitted to the queue so far has executed.
    pub async fn synchronize(&self) -> Result<()> {
        self.shared.settle().await
    }
}
