//! Host reduction kernels: `dst[i] = dst[i] op src[i]` for every element
//! type and [`ReduceOp`].
//!
//! The loops are plain zips over equal-length slices so that the compiler
//! vectorises them (f32/f64/integer Sum, Prod, Min, Max). Integers wrap.
//! `f16`/`bf16` are widened to f32, combined, and rounded once per step.
//! Float Min/Max follow IEEE `minNum`/`maxNum` (a NaN loses to a number), so
//! every op is commutative and all ranks of a ring or a butterfly compute
//! bitwise-identical results.
//!
//! Depends only on `datatype`.

use crate::datatype::{DType, ReduceOp};
use half::{bf16, f16, slice::HalfFloatSliceExt};

/// Why two byte buffers could not be reduced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReduceError {
    /// The two buffers differ in length, or are not whole elements.
    Length {
        /// Destination bytes.
        dst: usize,
        /// Source bytes.
        src: usize,
    },
    /// The destination is not aligned for its element type.
    Misaligned,
    /// `DType::Bytes` cannot be reduced.
    NotReducible,
}

impl std::fmt::Display for ReduceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReduceError::Length { dst, src } => {
                write!(f, "cannot reduce {src} bytes into {dst} bytes")
            }
            ReduceError::Misaligned => write!(f, "destination buffer is not aligned"),
            ReduceError::NotReducible => write!(f, "raw bytes cannot be reduced"),
        }
    }
}

macro_rules! int_kernel {
    ($dst:expr, $src:expr, $op:expr) => {{
        let (d, s) = ($dst, $src);
        match $op {
            ReduceOp::Sum => d
                .iter_mut()
                .zip(s)
                .for_each(|(a, b)| *a = a.wrapping_add(*b)),
            ReduceOp::Prod => d
                .iter_mut()
                .zip(s)
                .for_each(|(a, b)| *a = a.wrapping_mul(*b)),
            ReduceOp::Min => d.iter_mut().zip(s).for_each(|(a, b)| *a = (*a).min(*b)),
            ReduceOp::Max => d.iter_mut().zip(s).for_each(|(a, b)| *a = (*a).max(*b)),
        }
    }};
}

macro_rules! float_kernel {
    ($dst:expr, $src:expr, $op:expr) => {{
        let (d, s) = ($dst, $src);
        match $op {
            ReduceOp::Sum => d.iter_mut().zip(s).for_each(|(a, b)| *a += *b),
            ReduceOp::Prod => d.iter_mut().zip(s).for_each(|(a, b)| *a *= *b),
            ReduceOp::Min => d.iter_mut().zip(s).for_each(|(a, b)| *a = a.min(*b)),
            ReduceOp::Max => d.iter_mut().zip(s).for_each(|(a, b)| *a = a.max(*b)),
        }
    }};
}

/// Reduce typed slices: `dst[i] = dst[i] op src[i]`. Lengths must match.
pub fn reduce_slice<T: Reducible>(op: ReduceOp, dst: &mut [T], src: &[T]) {
    debug_assert_eq!(dst.len(), src.len());
    T::reduce(op, dst, src)
}

/// Element types with a reduction kernel.
pub trait Reducible: bytemuck::Pod {
    /// `dst[i] = dst[i] op src[i]`.
    fn reduce(op: ReduceOp, dst: &mut [Self], src: &[Self]);
}

macro_rules! reducible {
    (int: $($t:ty),*) => {$(
        impl Reducible for $t {
            fn reduce(op: ReduceOp, dst: &mut [Self], src: &[Self]) {
                int_kernel!(dst, src, op)
            }
        }
    )*};
    (float: $($t:ty),*) => {$(
        impl Reducible for $t {
            fn reduce(op: ReduceOp, dst: &mut [Self], src: &[Self]) {
                float_kernel!(dst, src, op)
            }
        }
    )*};
    (half: $($t:ty),*) => {$(
        impl Reducible for $t {
            fn reduce(op: ReduceOp, dst: &mut [Self], src: &[Self]) {
                // Widen a block at a time with the slice conversions (which
                // use the CPU's conversion instructions where it has them),
                // combine in f32, round once.
                const BLOCK: usize = 512;
                let mut a = [0f32; BLOCK];
                let mut b = [0f32; BLOCK];
                for (dc, sc) in dst.chunks_mut(BLOCK).zip(src.chunks(BLOCK)) {
                    let (a, b) = (&mut a[..dc.len()], &mut b[..dc.len()]);
                    dc.convert_to_f32_slice(a);
                    sc.convert_to_f32_slice(b);
                    f32::reduce(op, a, b);
                    dc.convert_from_f32_slice(a);
                }
            }
        }
    )*};
}

reducible!(int: i8, u8, i32, u32, i64, u64);
reducible!(float: f32, f64);
reducible!(half: f16, bf16);

/// Reduce `src` into `dst`, both holding whole elements of `dtype`. `dst`
/// must be aligned for `dtype`; `src` may have any alignment (received
/// network buffers), in which case it is reduced through a small aligned
/// staging buffer.
pub fn reduce_bytes(
    dtype: DType,
    op: ReduceOp,
    dst: &mut [u8],
    src: &[u8],
) -> Result<(), ReduceError> {
    let size = dtype.size();
    if dst.len() != src.len() || !dst.len().is_multiple_of(size) {
        return Err(ReduceError::Length {
            dst: dst.len(),
            src: src.len(),
        });
    }
    fn typed<T: Reducible>(op: ReduceOp, dst: &mut [u8], src: &[u8]) -> Result<(), ReduceError> {
        let d: &mut [T] = bytemuck::try_cast_slice_mut(dst).map_err(|_| ReduceError::Misaligned)?;
        match bytemuck::try_cast_slice::<u8, T>(src) {
            Ok(s) => T::reduce(op, d, s),
            Err(_) => {
                // Unaligned source: stage through an aligned buffer, a block
                // at a time so the staging stays in cache.
                const BLOCK: usize = 4096;
                let mut stage = vec![T::zeroed(); BLOCK.min(d.len())];
                let n = std::mem::size_of::<T>();
                for (dc, sc) in d.chunks_mut(BLOCK).zip(src.chunks(BLOCK * n)) {
                    let st = &mut stage[..dc.len()];
                    bytemuck::cast_slice_mut::<T, u8>(st).copy_from_slice(sc);
                    T::reduce(op, dc, st);
                }
            }
        }
        Ok(())
    }
    match dtype {
        DType::Bytes => Err(ReduceError::NotReducible),
        DType::F32 => typed::<f32>(op, dst, src),
        DType::F64 => typed::<f64>(op, dst, src),
        DType::F16 => typed::<f16>(op, dst, src),
        DType::BF16 => typed::<bf16>(op, dst, src),
        DType::I8 => typed::<i8>(op, dst, src),
        DType::U8 => typed::<u8>(op, dst, src),
        DType::I32 => typed::<i32>(op, dst, src),
        DType::U32 => typed::<u32>(op, dst, src),
        DType::I64 => typed::<i64>(op, dst, src),
        DType::U64 => typed::<u64>(op, dst, src),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPS: [ReduceOp; 4] = [ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Min, ReduceOp::Max];

    #[test]
    fn integer_ops_wrap_and_compare() {
        let mut d = [250u8, 3, 7];
        reduce_slice(ReduceOp::Sum, &mut d, &[10, 4, 0]);
        assert_eq!(d, [4, 7, 7]);
        let mut d = [-3i32, 5, i32::MAX];
        reduce_slice(ReduceOp::Prod, &mut d, &[4, -2, 2]);
        assert_eq!(d, [-12, -10, -2]);
        let mut d = [-3i64, 5];
        reduce_slice(ReduceOp::Min, &mut d, &[4, -2]);
        assert_eq!(d, [-3, -2]);
        let mut d = [1u64, 9];
        reduce_slice(ReduceOp::Max, &mut d, &[4, 2]);
        assert_eq!(d, [4, 9]);
    }

    #[test]
    fn float_ops_and_nan_loses_to_numbers() {
        let mut d = [1.5f32, f32::NAN, -0.5];
        reduce_slice(ReduceOp::Max, &mut d, &[1.0, 2.0, f32::NAN]);
        assert_eq!(d, [1.5, 2.0, -0.5]);
        let mut d = [1.5f64, 2.0];
        reduce_slice(ReduceOp::Sum, &mut d, &[0.25, -4.0]);
        assert_eq!(d, [1.75, -2.0]);
    }

    #[test]
    fn half_types_round_once_per_step() {
        let a = f16::from_f32(1.0);
        let b = f16::from_f32(0.000_488_281_25); // 2^-11: half an f16 ulp at 1.0
        let mut d = [a];
        reduce_slice(ReduceOp::Sum, &mut d, &[b]);
        assert_eq!(d[0], f16::from_f32(1.0 + 0.000_488_281_25));
        let mut d = [bf16::from_f32(3.0)];
        reduce_slice(ReduceOp::Prod, &mut d, &[bf16::from_f32(-2.0)]);
        assert_eq!(d[0].to_f32(), -6.0);
    }

    #[test]
    fn every_op_is_commutative_bitwise() {
        let xs = [0.1f32, -7.25, 3.0e-8, f32::NAN, 1.0e30];
        for op in OPS {
            for &x in &xs {
                for &y in &xs {
                    let (mut a, mut b) = ([x], [y]);
                    reduce_slice(op, &mut a, &[y]);
                    reduce_slice(op, &mut b, &[x]);
                    assert_eq!(a[0].to_bits(), b[0].to_bits(), "{op:?} {x} {y}");
                }
            }
        }
    }

    #[test]
    fn unaligned_sources_and_bad_lengths() {
        let mut dst = vec![1.0f32; 9000];
        let src: Vec<u8> = std::iter::once(0u8)
            .chain((0..9000).flat_map(|i| (i as f32).to_le_bytes()))
            .collect();
        reduce_bytes(
            DType::F32,
            ReduceOp::Sum,
            bytemuck::cast_slice_mut(&mut dst),
            &src[1..],
        )
        .unwrap();
        assert!(dst.iter().enumerate().all(|(i, &v)| v == i as f32 + 1.0));
        let mut d = [0u8; 8];
        assert_eq!(
            reduce_bytes(DType::F32, ReduceOp::Sum, &mut d, &[0; 4]),
            Err(ReduceError::Length { dst: 8, src: 4 })
        );
        assert_eq!(
            reduce_bytes(DType::Bytes, ReduceOp::Sum, &mut d, &[0; 8]),
            Err(ReduceError::NotReducible)
        );
    }
}
