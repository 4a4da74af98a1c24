//! Element types that rankmesh can move and reduce, their wire tags, and the
//! reduction operations.
//!
//! This module owns the closed set of supported element types. It must not
//! depend on any other module except `error` (and the crate's `u8_enum!`).

use half::{bf16, f16};

crate::tags::u8_enum! {
/// The wire tag of an element type. Frames carry it so that a receiver can
/// tell a type mismatch from a length mismatch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// Raw bytes (control payloads); never reduced.
    Bytes = 0,
    /// `f32`
    F32 = 1,
    /// `f64`
    F64 = 2,
    /// `half::f16`
    F16 = 3,
    /// `half::bf16`
    BF16 = 4,
    /// `i8`
    I8 = 5,
    /// `u8`
    U8 = 6,
    /// `i32`
    I32 = 7,
    /// `u32`
    U32 = 8,
    /// `i64`
    I64 = 9,
    /// `u64`
    U64 = 10,
}
}

impl DType {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::Bytes | DType::I8 | DType::U8 => 1,
            DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F64 | DType::I64 | DType::U64 => 8,
        }
    }

    /// The Rust name of the type, for error messages.
    pub fn name(self) -> &'static str {
        match self {
            DType::Bytes => "bytes",
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I8 => "i8",
            DType::U8 => "u8",
            DType::I32 => "i32",
            DType::U32 => "u32",
            DType::I64 => "i64",
            DType::U64 => "u64",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

mod sealed {
    pub trait Sealed {}
}

/// An element type rankmesh can send and reduce.
///
/// Implemented for `f32 f64 half::f16 half::bf16 i8 u8 i32 u32 i64 u64`.
/// The set is closed because every type needs reduction kernels.
pub trait Element: bytemuck::Pod + Send + Sync + 'static + sealed::Sealed {
    /// The wire tag of this type.
    const DTYPE: DType;
}

macro_rules! element {
    ($($t:ty => $d:ident),* $(,)?) => {
        $(
            impl sealed::Sealed for $t {}
            impl Element for $t {
                const DTYPE: DType = DType::$d;
            }
        )*
    };
}

element!(
    f32 => F32, f64 => F64, f16 => F16, bf16 => BF16, i8 => I8, u8 => U8,
    i32 => I32, u32 => U32, i64 => I64, u64 => U64,
);

crate::tags::u8_enum! {
/// A reduction operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// Element-wise sum (wrapping for integers).
    Sum = 1,
    /// Element-wise product (wrapping for integers).
    Prod = 2,
    /// Element-wise minimum.
    Min = 3,
    /// Element-wise maximum.
    Max = 4,
}
}

impl ReduceOp {
    /// Wire tag.
    pub fn to_u8(self) -> u8 {
        self as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_tags_round_trip_and_sizes_match_rust() {
        fn check<T: Element>() {
            assert_eq!(T::DTYPE.size(), std::mem::size_of::<T>());
            assert_eq!(DType::try_from(T::DTYPE as u8), Ok(T::DTYPE));
        }
        check::<f32>();
        check::<f64>();
        check::<f16>();
        check::<bf16>();
        check::<i8>();
        check::<u8>();
        check::<i32>();
        check::<u32>();
        check::<i64>();
        check::<u64>();
        assert_eq!(DType::try_from(200), Err(200));
        for op in [ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Min, ReduceOp::Max] {
            assert_eq!(ReduceOp::try_from(op.to_u8()), Ok(op));
        }
        assert_eq!(ReduceOp::try_from(0), Err(0));
    }
}
