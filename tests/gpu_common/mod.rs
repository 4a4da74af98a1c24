//! The checks shared by the GPU backends' tests: every device collective
//! against its host twin, bitwise, on one communicator.
#![allow(dead_code)]

use rankmesh::gpu::BoxFut;
use rankmesh::gpu::DeviceBuffer;
use rankmesh::{Communicator, Element, Error, ReduceOp, Result};
use std::fmt::Debug;

pub const OPS: [ReduceOp; 4] = [ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Min, ReduceOp::Max];
/// 0, 1, odd, and more than one staged chunk (the tests stage 1 KiB chunks).
pub const LENS: [usize; 4] = [0, 1, 7, 1001];

/// An element type under test.
pub trait Elem: Element + PartialEq + Debug {
    fn from_i(v: i64) -> Self;
    /// `v` rounded to this type (integers: truncated).
    fn from_f(v: f64) -> Self;
    fn bits(self) -> u64;
}

macro_rules! elem {
    ($($t:ty: |$v:ident| $conv:expr, |$f:ident| $fconv:expr, |$b:ident| $bits:expr;)*) => {$(
        impl Elem for $t {
            fn from_i($v: i64) -> Self { $conv }
            fn from_f($f: f64) -> Self { $fconv }
            fn bits(self) -> u64 { let $b = self; $bits }
        }
    )*};
}

elem! {
    f32: |v| v as f32 * 0.75, |f| f as f32, |x| u64::from(x.to_bits());
    f64: |v| v as f64 * 0.75, |f| f, |x| x.to_bits();
    i32: |v| v as i32, |f| f as i32, |x| x as u32 as u64;
    u32: |v| v as u32, |f| f as u32, |x| u64::from(x);
    i64: |v| v, |f| f as i64, |x| x as u64;
    u64: |v| v as u64, |f| f as u64, |x| x;
    half::f16: |v| half::f16::from_f32(v as f32 * 0.75), |f| half::f16::from_f64(f),
        |x| u64::from(x.to_bits());
    half::bf16: |v| half::bf16::from_f32(v as f32 * 0.75), |f| half::bf16::from_f64(f),
        |x| u64::from(x.to_bits());
}

/// Makes and reads buffers of one backend.
pub trait Dev<T: Elem>: Send + Sync {
    type Buf: DeviceBuffer + 'static;
    fn upload(&self, data: &[T]) -> Result<Self::Buf>;
    fn zeroed(&self, n: usize) -> Result<Self::Buf>;
    fn read<'a>(&'a self, b: &'a Self::Buf) -> BoxFut<'a, Result<Vec<T>>>;
}

/// Rank r's data: small values (so products stay finite), varied by index.
pub fn data<T: Elem>(r: usize, n: usize) -> Vec<T> {
    (0..n)
        .map(|i| T::from_i(((r * 7 + i * 3) % 5) as i64 + 1 - (i % 2) as i64 * 2))
        .collect()
}

/// Rank r's data with every mantissa bit in use, so that sums and
/// products must round (in every float type, f16 and bf16 included).
pub fn fine_data<T: Elem>(r: usize, n: usize) -> Vec<T> {
    (0..n)
        .map(|i| T::from_f(1.0 + ((r * 37 + i * 11) % 101) as f64 / 97.0))
        .collect()
}

pub fn same<T: Elem>(what: &str, dev: &[T], host: &[T]) -> Result<()> {
    let d: Vec<u64> = dev.iter().map(|v| v.bits()).collect();
    let h: Vec<u64> = host.iter().map(|v| v.bits()).collect();
    if d != h {
        return Err(Error::Config {
            detail: format!("{what}: device {dev:?} != host {host:?}"),
        });
    }
    Ok(())
}

/// Every device collective against its host twin. `full`: also reduce,
/// all_gather and reduce_scatter (else allreduce and broadcast only).
pub async fn grid<T: Elem, D: Dev<T>>(comm: &Communicator, gpu: &D, full: bool) -> Result<()> {
    let (r, p) = (comm.rank(), comm.size());
    for n in LENS {
        let what = |op: &str| format!("{op} {:?} n={n} p={p} rank {r}", T::DTYPE);
        // Every op, then values whose sums and products round (the device
        // must round as the host does).
        let rounding = [ReduceOp::Sum, ReduceOp::Prod].map(|op| (op, true));
        for (op, fine) in OPS.iter().map(|&op| (op, false)).chain(rounding) {
            let mut host = if fine {
                fine_data::<T>(r, n)
            } else {
                data::<T>(r, n)
            };
            let mut dev = gpu.upload(&host)?;
            comm.all_reduce(&mut host, op).await?;
            comm.all_reduce_device(&mut dev, op).await?;
            let label = if fine { " (rounding)" } else { "" };
            same(
                &what(&format!("all_reduce {op:?}{label}")),
                &gpu.read(&dev).await?,
                &host,
            )?;
        }
        let root = p - 1;
        let mut host = data::<T>(r, n);
        let mut dev = gpu.upload(&host)?;
        comm.broadcast(&mut host, root).await?;
        comm.broadcast_device(&mut dev, root).await?;
        same(&what("broadcast"), &gpu.read(&dev).await?, &host)?;
        if !full {
            continue;
        }

        let mut host = data::<T>(r, n);
        let mut dev = gpu.upload(&host)?;
        comm.reduce(&mut host, ReduceOp::Sum, 0).await?;
        comm.reduce_device(&mut dev, ReduceOp::Sum, 0).await?;
        same(&what("reduce"), &gpu.read(&dev).await?, &host)?;

        let send = data::<T>(r, n);
        let mut host = vec![T::from_i(0); n * p];
        let dsend = gpu.upload(&send)?;
        let mut drecv = gpu.zeroed(n * p)?;
        comm.all_gather(&send, &mut host).await?;
        comm.all_gather_device(&dsend, &mut drecv).await?;
        same(&what("all_gather"), &gpu.read(&drecv).await?, &host)?;

        let send = data::<T>(r, n * p);
        let mut host = vec![T::from_i(0); n];
        let dsend = gpu.upload(&send)?;
        let mut drecv = gpu.zeroed(n)?;
        comm.reduce_scatter(&send, &mut host, ReduceOp::Max).await?;
        comm.reduce_scatter_device(&dsend, &mut drecv, ReduceOp::Max)
            .await?;
        same(&what("reduce_scatter"), &gpu.read(&drecv).await?, &host)?;
        // The send buffer is left as it was.
        same(
            &what("reduce_scatter send"),
            &gpu.read(&dsend).await?,
            &send,
        )?;
    }
    Ok(())
}
