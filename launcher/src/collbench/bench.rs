//! Timing one collective at one size on one rank, and checking its result.
//!
//! Every rank fills its input from a formula of (rank, index) with small
//! integers, so that the expected result is exact in every element type;
//! the in-place collectives (allreduce, reduce) get their input back before
//! each iteration, outside the timed region.

use crate::args::{Coll, Op};
use crate::device::{Device, Staged};
use rankmesh::{Communicator, Element, ReduceOp, Result};
use std::time::{Duration, Instant};

/// An element type collbench can fill with small integers and compare.
pub trait Val: Element + PartialEq {
    /// Largest integer every value of the type holds exactly.
    const EXACT: u32;
    fn from_u32(v: u32) -> Self;
}

macro_rules! val_int {
    ($($t:ty),*) => {$(
        impl Val for $t {
            const EXACT: u32 = if (<$t>::MAX as u128) < u32::MAX as u128 {
                <$t>::MAX as u32
            } else {
                u32::MAX
            };
            fn from_u32(v: u32) -> Self {
                v as $t
            }
        }
    )*};
}
val_int!(i8, u8, i32, u32, i64, u64);

impl Val for f32 {
    const EXACT: u32 = 1 << 24;
    fn from_u32(v: u32) -> Self {
        v as f32
    }
}

impl Val for f64 {
    const EXACT: u32 = u32::MAX;
    fn from_u32(v: u32) -> Self {
        f64::from(v)
    }
}

impl Val for half::f16 {
    const EXACT: u32 = 2048;
    fn from_u32(v: u32) -> Self {
        half::f16::from_f32(v as f32)
    }
}

impl Val for half::bf16 {
    const EXACT: u32 = 256;
    fn from_u32(v: u32) -> Self {
        half::bf16::from_f32(v as f32)
    }
}

/// What one size of one collective measured on this rank.
pub struct Measured {
    /// Seconds per iteration, the maximum over ranks, median over batches.
    pub secs: f64,
    /// Wrong elements over all ranks (0 when not checked).
    pub wrong: u64,
}

/// The inputs of a run: which rank, how many, and the values.
struct Plan {
    r: usize,
    p: usize,
    op: Op,
    /// Values small enough that a sum over every rank stays exact.
    sum_small: bool,
}

impl Plan {
    /// Rank `q`'s element `i` (of its input, or of the block it sends to
    /// rank `dst` in an alltoall).
    fn v(&self, q: usize, i: usize, dst: usize) -> u32 {
        match self.op {
            // Exactly one rank holds 2 at each index: the product is 2.
            Op::Prod => 1 + u32::from((q + i + dst).is_multiple_of(self.p)),
            Op::Sum if !self.sum_small => u32::from((q + i + dst).is_multiple_of(self.p)),
            // Varies with index and rank, so misplaced blocks show.
            _ => ((q * q + i + (i / 3) * q + 2 * dst) % 3) as u32,
        }
    }

    /// The reduction over every rank of element `i`.
    fn reduced(&self, i: usize) -> u32 {
        let all = (0..self.p).map(|q| self.v(q, i, 0));
        match self.op {
            Op::Sum => all.sum(),
            Op::Prod => all.product(),
            Op::Min => all.min().unwrap_or(0),
            Op::Max => all.max().unwrap_or(0),
        }
    }
}

fn fill<T: Val>(n: usize, f: impl Fn(usize) -> u32) -> Vec<T> {
    (0..n).map(|i| T::from_u32(f(i))).collect()
}

fn wrong<T: Val>(got: &[T], want: impl Fn(usize) -> u32) -> u64 {
    got.iter()
        .enumerate()
        .filter(|(i, g)| **g != T::from_u32(want(*i)))
        .count() as u64
}

/// Buffers of one collective at one size, on one rank: on the host, and
/// with `--device` their device copies (which the collectives then use).
struct Bufs<T> {
    input: Vec<T>,
    send: Vec<T>,
    recv: Vec<T>,
    dev: Option<DevBufs>,
}

struct DevBufs {
    send: Option<Box<dyn Staged>>,
    recv: Box<dyn Staged>,
}

/// Time `coll` on `count` elements (the total over ranks for the
/// collectives that split it in blocks), `warmup` untimed iterations, then
/// `batches` of `iters` timed ones; check one more run if `check`.
#[allow(clippy::too_many_arguments)]
pub async fn measure<T: Val>(
    comm: &Communicator,
    device: &Device,
    coll: Coll,
    count: usize,
    op: Op,
    root: usize,
    (warmup, iters, batches): (usize, usize, usize),
    check: bool,
) -> Result<Measured> {
    let (r, p) = (comm.rank(), comm.size());
    let plan = Plan {
        r,
        p,
        op,
        sum_small: (2 * p as u64) <= u64::from(T::EXACT),
    };
    let m = if coll.blocked() { count / p } else { count };
    let mut b = on(device, coll, setup::<T>(&plan, coll, m, root))?;
    for _ in 0..warmup {
        once(comm, coll, &mut b, op.reduce_op(), root, p).await?;
    }
    let mut times = Vec::with_capacity(batches);
    for _ in 0..batches {
        let mut spent = Duration::ZERO;
        for _ in 0..iters {
            spent += once(comm, coll, &mut b, op.reduce_op(), root, p).await?;
        }
        let mut per = [spent.as_secs_f64() / iters as f64];
        comm.all_reduce(&mut per, ReduceOp::Max).await?;
        times.push(per[0]);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let mut bad = [0u64];
    if check {
        b = on(device, coll, setup::<T>(&plan, coll, m, root))?;
        once(comm, coll, &mut b, op.reduce_op(), root, p).await?;
        fetch(&mut b).await?;
        bad[0] = verify(&plan, coll, m, root, &b);
        comm.all_reduce(&mut bad, ReduceOp::Sum).await?;
    }
    Ok(Measured {
        secs: times[times.len() / 2],
        wrong: bad[0],
    })
}

fn setup<T: Val>(plan: &Plan, coll: Coll, m: usize, root: usize) -> Bufs<T> {
    let (r, p) = (plan.r, plan.p);
    let mine = |i| plan.v(r, i, 0);
    let (input, send, recv) = match coll {
        Coll::Allreduce | Coll::Reduce => (fill(m, mine), Vec::new(), fill(m, mine)),
        Coll::Broadcast => {
            let v: Vec<T> = if r == root {
                fill(m, mine)
            } else {
                fill(m, |_| 0)
            };
            (Vec::new(), Vec::new(), v)
        }
        Coll::Allgather | Coll::Gather => {
            let recv = if coll == Coll::Gather && r != root {
                Vec::new()
            } else {
                fill(m * p, |_| 0)
            };
            (Vec::new(), fill(m, mine), recv)
        }
        Coll::Reducescatter => (Vec::new(), fill(m * p, mine), fill(m, |_| 0)),
        Coll::Scatter => {
            let send = if r == root {
                fill(m * p, mine)
            } else {
                Vec::new()
            };
            (Vec::new(), send, fill(m, |_| 0))
        }
        Coll::Alltoall => (
            Vec::new(),
            fill(m * p, |j| plan.v(r, j % m.max(1), j / m.max(1))),
            fill(m * p, |_| 0),
        ),
        Coll::Sendrecv | Coll::Pingpong => (Vec::new(), fill(m, mine), fill(m, |_| 0)),
        Coll::Barrier => (Vec::new(), Vec::new(), Vec::new()),
    };
    Bufs {
        input,
        send,
        recv,
        dev: None,
    }
}

/// `b` with device copies of its buffers, when the device is not the host.
fn on<T: Val>(device: &Device, coll: Coll, mut b: Bufs<T>) -> Result<Bufs<T>> {
    if let Some(recv) = device.buffer(&b.recv)? {
        // Zero elements is a size too (a block per rank of a tiny size).
        let send = if matches!(coll, Coll::Allgather | Coll::Reducescatter) {
            device.buffer(&b.send)?
        } else {
            None
        };
        b.dev = Some(DevBufs { send, recv });
    }
    Ok(b)
}

/// Copy a device result back into `b.recv` for checking.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
async fn fetch<T: Val>(b: &mut Bufs<T>) -> Result<()> {
    if let Some(d) = &b.dev {
        b.recv = bytemuck::pod_collect_to_vec(&d.recv.fetch().await?);
    }
    Ok(())
}

#[cfg(not(any(feature = "wgpu", feature = "cuda")))]
async fn fetch<T: Val>(_: &mut Bufs<T>) -> Result<()> {
    Ok(())
}

/// One iteration; the time of the collective alone.
async fn once<T: Val>(
    comm: &Communicator,
    coll: Coll,
    b: &mut Bufs<T>,
    op: ReduceOp,
    root: usize,
    p: usize,
) -> Result<Duration> {
    if let Some(d) = b.dev.as_mut() {
        return once_device(comm, coll, d, &b.input, op, root).await;
    }
    if !b.input.is_empty() {
        b.recv.copy_from_slice(&b.input);
    }
    let r = comm.rank();
    let t = Instant::now();
    match coll {
        Coll::Allreduce => comm.all_reduce(&mut b.recv, op).await?,
        Coll::Reduce => comm.reduce(&mut b.recv, op, root).await?,
        Coll::Broadcast => comm.broadcast(&mut b.recv, root).await?,
        Coll::Allgather => comm.all_gather(&b.send, &mut b.recv).await?,
        Coll::Reducescatter => comm.reduce_scatter(&b.send, &mut b.recv, op).await?,
        Coll::Alltoall => comm.all_to_all(&b.send, &mut b.recv).await?,
        Coll::Gather => comm.gather(&b.send, &mut b.recv, root).await?,
        Coll::Scatter => comm.scatter(&b.send, &mut b.recv, root).await?,
        Coll::Barrier => comm.barrier().await?,
        Coll::Sendrecv => {
            let (right, left) = ((r + 1) % p, (r + p - 1) % p);
            let (s, v) = tokio::join!(
                comm.send(&b.send, right, 0),
                comm.recv(&mut b.recv, left, 0)
            );
            s?;
            v?;
        }
        Coll::Pingpong => {
            match r {
                0 => {
                    comm.send(&b.send, 1, 1).await?;
                    comm.recv(&mut b.recv, 1, 2).await?;
                }
                1 => {
                    comm.recv(&mut b.recv, 0, 1).await?;
                    comm.send(&b.recv, 0, 2).await?;
                }
                _ => {}
            }
            return Ok(t.elapsed() / 2);
        }
    }
    Ok(t.elapsed())
}

/// One iteration on device buffers (the input is restored, and the device
/// has it, before the clock starts).
#[cfg_attr(not(any(feature = "wgpu", feature = "cuda")), allow(unused_variables))]
async fn once_device<T: Val>(
    comm: &Communicator,
    coll: Coll,
    d: &mut DevBufs,
    input: &[T],
    op: ReduceOp,
    root: usize,
) -> Result<Duration> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    if !input.is_empty() {
        d.recv.load(bytemuck::cast_slice(input)).await?;
    }
    let t = Instant::now();
    let recv = d.recv.buf_mut();
    match (coll, d.send.as_ref()) {
        (Coll::Allreduce, _) => comm.all_reduce_device(recv, op).await?,
        (Coll::Reduce, _) => comm.reduce_device(recv, op, root).await?,
        (Coll::Broadcast, _) => comm.broadcast_device(recv, root).await?,
        (Coll::Allgather, Some(s)) => comm.all_gather_device(s.buf(), recv).await?,
        (Coll::Reducescatter, Some(s)) => comm.reduce_scatter_device(s.buf(), recv, op).await?,
        (Coll::Barrier, _) => comm.barrier().await?,
        (other, _) => {
            return Err(rankmesh::Error::Config {
                detail: crate::device::unsupported(crate::args::DeviceKind::Wgpu, other)
                    .unwrap_or_else(|| format!("--coll {}: no send buffer", other.name())),
            })
        }
    }
    Ok(t.elapsed())
}

/// Wrong elements of this rank's result.
fn verify<T: Val>(plan: &Plan, coll: Coll, m: usize, root: usize, b: &Bufs<T>) -> u64 {
    let (r, p) = (plan.r, plan.p);
    match coll {
        Coll::Allreduce => wrong(&b.recv, |i| plan.reduced(i)),
        Coll::Reduce if r == root => wrong(&b.recv, |i| plan.reduced(i)),
        Coll::Broadcast => wrong(&b.recv, |i| plan.v(root, i, 0)),
        Coll::Allgather => wrong(&b.recv, |j| plan.v(j / m.max(1), j % m.max(1), 0)),
        Coll::Gather if r == root => wrong(&b.recv, |j| plan.v(j / m.max(1), j % m.max(1), 0)),
        Coll::Reducescatter => wrong(&b.recv, |i| plan.reduced(r * m + i)),
        Coll::Scatter => wrong(&b.recv, |i| plan.v(root, r * m + i, 0)),
        Coll::Alltoall => wrong(&b.recv, |j| plan.v(j / m.max(1), j % m.max(1), r)),
        Coll::Sendrecv => wrong(&b.recv, |i| plan.v((r + p - 1) % p, i, 0)),
        // Rank 0's message, at rank 1 and back at rank 0.
        Coll::Pingpong if r < 2 => wrong(&b.recv, |i| plan.v(0, i, 0)),
        Coll::Pingpong => 0,
        Coll::Reduce | Coll::Gather | Coll::Barrier => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_values_stay_exact_in_the_narrowest_types() {
        for p in [1, 2, 3, 8, 200] {
            for op in [Op::Sum, Op::Prod, Op::Min, Op::Max] {
                let plan = Plan {
                    r: 0,
                    p,
                    op,
                    sum_small: 2 * p as u64 <= u64::from(<i8 as Val>::EXACT),
                };
                for i in 0..50 {
                    assert!(plan.reduced(i) <= <i8 as Val>::EXACT, "{op:?} p={p} i={i}");
                }
            }
        }
        assert_eq!(<u8 as Val>::EXACT, 255);
        assert_eq!(<u64 as Val>::EXACT, u32::MAX);
    }

    #[test]
    fn the_check_counts_each_wrong_element() {
        // Rank 1 of 3: what an alltoall and an allreduce must leave.
        let plan = Plan {
            r: 1,
            p: 3,
            op: Op::Sum,
            sum_small: true,
        };
        let m = 4;
        let right: Vec<f32> = fill(m * 3, |j| plan.v(j / m, j % m, 1));
        let mut b = Bufs {
            input: Vec::new(),
            send: Vec::new(),
            recv: right,
            dev: None,
        };
        assert_eq!(verify(&plan, Coll::Alltoall, m, 0, &b), 0);
        b.recv[5] += 1.0;
        b.recv[11] = f32::NAN;
        assert_eq!(verify(&plan, Coll::Alltoall, m, 0, &b), 2);
        b.recv = fill(m, |i| plan.reduced(i));
        assert_eq!(verify(&plan, Coll::Allreduce, m, 0, &b), 0);
        b.recv[0] += 1.0;
        assert!(verify(&plan, Coll::Allreduce, m, 0, &b) > 0);
    }
}
