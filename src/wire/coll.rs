//! What identifies a collective call on the wire: the collective kind, and
//! the descriptor (kind, element type, op, count, root) every frame of a
//! call carries so that ranks that disagree on the call are caught.

use super::Header;
use crate::datatype::{DType, ReduceOp};

crate::tags::u8_enum! {
/// Which collective a frame belongs to (the header's `coll` byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CollKind {
    /// `barrier`
    Barrier = 1,
    /// `broadcast`
    Broadcast = 2,
    /// `all_reduce`
    AllReduce = 3,
    /// `reduce`
    Reduce = 4,
    /// `all_gather`
    AllGather = 5,
    /// `reduce_scatter`
    ReduceScatter = 6,
    /// `gather`
    Gather = 7,
    /// `scatter`
    Scatter = 8,
    /// `all_to_all`
    AllToAll = 9,
    /// `split` (exchanging colors and keys)
    Split = 10,
}
}

impl CollKind {
    /// The API name.
    pub fn name(self) -> &'static str {
        match self {
            CollKind::Barrier => "barrier",
            CollKind::Broadcast => "broadcast",
            CollKind::AllReduce => "all_reduce",
            CollKind::Reduce => "reduce",
            CollKind::AllGather => "all_gather",
            CollKind::ReduceScatter => "reduce_scatter",
            CollKind::Gather => "gather",
            CollKind::Scatter => "scatter",
            CollKind::AllToAll => "all_to_all",
            CollKind::Split => "split",
        }
    }
}

/// The fields of a collective frame that every rank must agree on for one
/// call: collective kind, element type, op, element count and root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CollDesc {
    /// Collective kind tag.
    pub coll: u8,
    /// Element type.
    pub dtype: DType,
    /// Reduce-op tag (0 = none).
    pub op: u8,
    /// Element count.
    pub total: u64,
    /// Root (`u32::MAX` = none).
    pub root: u32,
}

impl CollDesc {
    /// The descriptor a frame carries.
    pub fn of(h: &Header) -> CollDesc {
        CollDesc {
            coll: h.coll,
            dtype: h.dtype,
            op: h.op,
            total: h.total,
            root: h.root,
        }
    }
}

impl std::fmt::Display for CollDesc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match CollKind::try_from(self.coll) {
            Ok(k) => write!(f, "{}", k.name())?,
            Err(_) => write!(f, "collective #{}", self.coll)?,
        }
        write!(f, " with {} elements of {}", self.total, self.dtype)?;
        if let Ok(op) = ReduceOp::try_from(self.op) {
            write!(f, ", op {op:?}")?;
        }
        if self.root != u32::MAX {
            write!(f, ", root {}", self.root)?;
        }
        Ok(())
    }
}

/// First payload byte of an Abort frame: the ranks disagree on the call.
pub const ABORT_MISMATCH: u8 = b'M';
/// First payload byte of an Abort frame: any other failure.
pub const ABORT_FAILED: u8 = b'F';

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coll_kinds_round_trip_and_descriptors_read_well() {
        for v in 1..=10u8 {
            assert_eq!(CollKind::try_from(v).map(|k| k as u8), Ok(v));
        }
        assert_eq!(CollKind::try_from(0), Err(0));
        let d = CollDesc {
            coll: CollKind::AllReduce as u8,
            dtype: DType::F32,
            op: ReduceOp::Sum.to_u8(),
            total: 10,
            root: u32::MAX,
        };
        assert_eq!(d.to_string(), "all_reduce with 10 elements of f32, op Sum");
    }
}
