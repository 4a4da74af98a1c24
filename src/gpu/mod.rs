//! Collectives on device memory.
//!
//! A [`DeviceBuffer`] is a typed array in a GPU's memory. The collectives
//! (`Communicator::all_reduce_device` and its siblings) run the same
//! schedules as on host memory, but every chunk travels device -> host
//! staging -> network -> host staging -> device, and reductions run **on the
//! device** in a compute kernel. Each backend keeps a pool of staging
//! buffers per device; one call uses a small ring of them, so the copy of
//! one chunk, the network transfer of another and the device reduction of a
//! third overlap, and nothing is allocated per chunk once the pool is warm.
//!
//! Backends (cargo features, off by default):
//! - `wgpu`: `Wgpu` and `WgpuBuffer` (WGSL compute shaders; any Vulkan
//!   or Metal adapter, including Mesa's lavapipe on a CPU).
//! - `cuda`: `Cuda` and `CudaBuffer` (cudarc, loaded at run time; kernels
//!   compiled with NVRTC on first use).
//!
//! Both backends' buffers get their [`DeviceBuffer`] implementation from
//! one place (`resident.rs`); a backend supplies only allocation, staging
//! and on-device copies.
//!
//! This module sees only `error`, `datatype`, `boxfut` and `env` (for the
//! device index); `coll` drives buffers through the trait alone.

pub use crate::boxfut::BoxFut;
use crate::datatype::{DType, ReduceOp};
use crate::{Error, Result};
use bytes::Bytes;
use std::any::Any;
use std::ops::Range;
use tokio::sync::mpsc;

#[cfg(feature = "cuda")]
mod cuda_backend;
#[cfg(feature = "cuda")]
mod nvrtc;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod resident;
#[cfg(feature = "wgpu")]
mod wgpu_backend;

#[cfg(feature = "cuda")]
pub use cuda_backend::{Cuda, CudaBuffer, CudaElement, CudaOptions};
/// The cudarc version this crate is built against.
#[cfg(feature = "cuda")]
pub use cudarc;
/// The wgpu version this crate is built against.
#[cfg(feature = "wgpu")]
pub use wgpu;
#[cfg(feature = "wgpu")]
pub use wgpu_backend::{Wgpu, WgpuBuffer, WgpuElement, WgpuOptions};

/// Default size of one staged chunk (bytes).
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;
/// Default number of staging buffers one transfer keeps in flight.
pub const DEFAULT_RING: usize = 3;

/// A typed array in device memory that collectives can run on.
///
/// Implemented by the backends of this module; the methods are the staging
/// primitives the collective executor needs. All of them take `&self`: the
/// collective that drives a buffer holds it mutably, and the executor never
/// writes a range while it reads an overlapping one.
pub trait DeviceBuffer: Send + Sync {
    /// Element type.
    fn dtype(&self) -> DType;

    /// Number of elements.
    fn len(&self) -> usize;

    /// Whether the buffer holds no elements.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Backend and device, for messages (e.g. "wgpu (llvmpipe, Vulkan)").
    fn describe(&self) -> String;

    /// Stage the elements `range` to the host, in order, one chunk at a
    /// time, sending each chunk on `out`. Stops early without error when
    /// `out` is closed (the consumer gave up and reports why).
    fn download(&self, range: Range<usize>, out: mpsc::Sender<Bytes>) -> BoxFut<'_, Result<()>>;

    /// Apply the bytes arriving on `input` (chunks of any size, `range`'s
    /// byte length in all) to the elements `range`: overwrite them when `op`
    /// is `None`, else `self[i] = self[i] op incoming[i]` on the device.
    /// Completes once the device has applied all of it. Input that ends
    /// early is an error.
    fn upload(
        &self,
        range: Range<usize>,
        op: Option<ReduceOp>,
        input: mpsc::Receiver<Bytes>,
    ) -> BoxFut<'_, Result<()>>;

    /// A new buffer on the same device holding a copy of the elements
    /// `range` (scratch space for collectives that must not write the
    /// caller's buffer).
    fn duplicate(&self, range: Range<usize>) -> Result<Box<dyn DeviceBuffer>>;

    /// Copy the elements `range` of `src` (a buffer of the same backend and
    /// device) into this buffer starting at element `at`.
    fn copy_from(&self, src: &dyn DeviceBuffer, range: Range<usize>, at: usize) -> Result<()>;

    /// For backends to recognise their own buffers.
    fn as_any(&self) -> &dyn Any;
}

/// An error of a GPU backend.
#[cfg_attr(not(any(feature = "wgpu", feature = "cuda")), allow(dead_code))]
pub(crate) fn gpu_err(detail: impl std::fmt::Display) -> Error {
    Error::Gpu {
        detail: detail.to_string(),
    }
}

/// Check that `range` lies within a buffer of `len` elements.
#[cfg_attr(not(any(feature = "wgpu", feature = "cuda")), allow(dead_code))]
pub(crate) fn check_range(what: &str, range: &Range<usize>, len: usize) -> Result<()> {
    if range.start > range.end || range.end > len {
        return Err(gpu_err(format!(
            "{what}: elements {}..{} are outside a buffer of {len} elements",
            range.start, range.end
        )));
    }
    Ok(())
}

/// The byte range of the elements `range` of a buffer of `len` elements
/// of `esz` bytes, checked.
#[cfg_attr(not(any(feature = "wgpu", feature = "cuda")), allow(dead_code))]
pub(crate) fn byte_range(
    what: &str,
    range: &Range<usize>,
    len: usize,
    esz: usize,
) -> Result<Range<usize>> {
    check_range(what, range, len)?;
    Ok(range.start * esz..range.end * esz)
}

/// One planned copy between device memory and a host staging slot: the
/// bytes `dev` of the transferred buffer and the bytes `host` of staging
/// slot `slot` (of a ring of `ring` slots, each `chunk` bytes). Both sides
/// always have the same length: a copy moves exactly its range's bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA backend's staging
pub(crate) struct StagedCopy {
    pub(crate) dev: Range<usize>,
    pub(crate) slot: usize,
    pub(crate) host: Range<usize>,
}

/// The copies that stage the device bytes `bytes` through a ring of `ring`
/// slots of `chunk` bytes: chunk `k` covers `bytes.start + k * chunk` up to
/// `chunk` bytes (the last one shorter) and uses slot `k % ring`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA backend's staging
pub(crate) fn staging_plan(
    bytes: Range<usize>,
    chunk: usize,
    ring: usize,
) -> impl Iterator<Item = StagedCopy> {
    let chunk = chunk.max(1);
    let ring = ring.max(1);
    let count = bytes.len().div_ceil(chunk);
    (0..count).map(move |k| {
        let start = bytes.start + k * chunk;
        let end = (start + chunk).min(bytes.end);
        StagedCopy {
            dev: start..end,
            slot: k % ring,
            host: 0..end - start,
        }
    })
}

/// The two sides of a planned copy, sliced to exactly its bytes: `dev_len`
/// is the length of the device buffer (bytes), `host` the whole staging
/// slot. An error (never a panic) when either range does not fit or the
/// two lengths differ.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the CUDA backend's staging
pub(crate) fn exact_sides<'h>(
    c: &StagedCopy,
    dev_len: usize,
    host: &'h mut [u8],
) -> Result<(Range<usize>, &'h mut [u8])> {
    if c.dev.start > c.dev.end || c.dev.end > dev_len {
        return Err(gpu_err(format!(
            "staging copy: device bytes {}..{} are outside a buffer of {dev_len} bytes",
            c.dev.start, c.dev.end
        )));
    }
    if c.host.start > c.host.end || c.host.end > host.len() {
        return Err(gpu_err(format!(
            "staging copy: host bytes {}..{} are outside a staging slot of {} bytes",
            c.host.start,
            c.host.end,
            host.len()
        )));
    }
    if c.dev.len() != c.host.len() {
        return Err(gpu_err(format!(
            "staging copy: {} device bytes planned against {} host bytes",
            c.dev.len(),
            c.host.len()
        )));
    }
    Ok((c.dev.clone(), &mut host[c.host.clone()]))
}

/// Gathers network chunks (of any size) into staging chunks of exactly
/// `chunk` bytes (the last one shorter) without copying: a staging chunk is
/// a list of pieces of the received `Bytes`.
#[cfg_attr(not(feature = "wgpu"), allow(dead_code))] // the wgpu backend's staging
pub(crate) struct Packer {
    input: mpsc::Receiver<Bytes>,
    pending: Option<Bytes>,
    left: usize,
    chunk: usize,
}

#[cfg_attr(not(feature = "wgpu"), allow(dead_code))] // the wgpu backend's staging
impl Packer {
    /// Pack `total` bytes from `input` into chunks of `chunk` bytes.
    pub(crate) fn new(input: mpsc::Receiver<Bytes>, total: usize, chunk: usize) -> Packer {
        Packer {
            input,
            pending: None,
            left: total,
            chunk: chunk.max(1),
        }
    }

    /// The next staging chunk as pieces, or `None` when all bytes were
    /// delivered. Input that ends early, or carries more than expected, is
    /// an error.
    pub(crate) async fn next(&mut self, pieces: &mut Vec<Bytes>) -> Result<Option<usize>> {
        pieces.clear();
        if self.left == 0 {
            if self.pending.as_ref().is_some_and(|b| !b.is_empty()) {
                return Err(gpu_err("more bytes arrived than the range holds"));
            }
            return Ok(None);
        }
        let want = self.chunk.min(self.left);
        let mut have = 0;
        while have < want {
            let mut b = match self.pending.take() {
                Some(b) if !b.is_empty() => b,
                _ => match self.input.recv().await {
                    Some(b) => b,
                    None => {
                        return Err(gpu_err(format!(
                            "input ended {} bytes short",
                            self.left - have
                        )))
                    }
                },
            };
            let take = (want - have).min(b.len());
            let rest = b.split_off(take);
            if !rest.is_empty() {
                self.pending = Some(rest);
            }
            have += take;
            pieces.push(b);
        }
        self.left -= want;
        Ok(Some(want))
    }
}

/// Copy `pieces` one after the other into `dst` (which holds their total).
#[cfg_attr(not(feature = "wgpu"), allow(dead_code))] // the wgpu backend's staging
pub(crate) fn concat_into(pieces: &[Bytes], mut write: impl FnMut(usize, &[u8])) {
    let mut at = 0;
    for p in pieces {
        write(at, p);
        at += p.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn packer_regroups_without_losing_bytes() {
        let (tx, rx) = mpsc::channel(16);
        let data: Vec<u8> = (0..100u8).collect();
        for part in [&data[..3], &data[3..50], &data[50..51], &data[51..]] {
            tx.send(Bytes::copy_from_slice(part)).await.unwrap();
        }
        drop(tx);
        let mut p = Packer::new(rx, 100, 16);
        let mut pieces = Vec::new();
        let mut out = Vec::new();
        while let Some(n) = p.next(&mut pieces).await.unwrap() {
            let before = out.len();
            for b in &pieces {
                out.extend_from_slice(b);
            }
            assert_eq!(out.len() - before, n);
            assert!(n == 16 || out.len() == 100);
        }
        assert_eq!(out, data);
    }

    #[tokio::test]
    async fn packer_short_and_long_input_are_errors() {
        let (tx, rx) = mpsc::channel(4);
        tx.send(Bytes::from_static(&[1, 2, 3])).await.unwrap();
        drop(tx);
        let mut p = Packer::new(rx, 8, 16);
        let e = p.next(&mut Vec::new()).await.unwrap_err().to_string();
        assert!(e.contains("5 bytes short"), "{e}");

        let (tx, rx) = mpsc::channel(4);
        tx.send(Bytes::from_static(&[1, 2, 3, 4, 5])).await.unwrap();
        drop(tx);
        let mut p = Packer::new(rx, 4, 16);
        let mut pieces = Vec::new();
        assert_eq!(p.next(&mut pieces).await.unwrap(), Some(4));
        let e = p.next(&mut pieces).await.unwrap_err().to_string();
        assert!(e.contains("more bytes"), "{e}");
    }

    /// Every planned copy moves exactly its range's bytes: host side as
    /// long as the device side, within its slot, chunks contiguous and in
    /// order, and a slot reused only after `ring` other chunks.
    #[test]
    fn staging_plan_slices_both_sides_to_the_same_bytes() {
        for start in [0usize, 1, 8, 1000] {
            for len in [0usize, 1, 7, 255, 256, 257, 1023, 1024, 1025, 4096, 10_000] {
                for chunk in [1usize, 8, 256, 1000, 1024, 4096] {
                    for ring in [1usize, 2, 3, 5] {
                        let bytes = start..start + len;
                        let plan: Vec<_> = staging_plan(bytes.clone(), chunk, ring).collect();
                        let mut at = bytes.start;
                        let mut slot_mem = vec![0u8; chunk];
                        for (k, c) in plan.iter().enumerate() {
                            let ctx =
                                format!("{bytes:?} chunk {chunk} ring {ring} copy {k}: {c:?}");
                            assert_eq!(c.dev.start, at, "{ctx}");
                            assert!(!c.dev.is_empty() && c.dev.len() <= chunk, "{ctx}");
                            assert_eq!(
                                c.host.len(),
                                c.dev.len(),
                                "{ctx}: destination not sliced to its source"
                            );
                            assert!(c.host.end <= chunk, "{ctx}");
                            assert_eq!(c.slot, k % ring, "{ctx}");
                            let (dev, host) = exact_sides(c, bytes.end, &mut slot_mem).unwrap();
                            assert_eq!(dev.len(), host.len(), "{ctx}");
                            at = c.dev.end;
                        }
                        assert_eq!(at, bytes.end, "{bytes:?} chunk {chunk}: not covered");
                    }
                }
            }
        }
    }

    #[test]
    fn a_copy_that_does_not_fit_is_an_error() {
        let mut slot = vec![0u8; 16];
        let cases = [
            (0..8, 0..16, "8 device bytes"),
            (90..110, 0..20, "outside a buffer"),
            (0..20, 0..20, "staging slot"),
        ];
        for (dev, host, said) in cases {
            let c = StagedCopy { dev, slot: 0, host };
            let e = exact_sides(&c, 100, &mut slot).unwrap_err().to_string();
            assert!(e.contains(said), "{c:?}: {e}");
        }
    }
}
