//! Reduction kernel throughput on one core, warm 1 MiB buffers:
//! `cargo bench -p rankmesh --bench reduce`. GB/s counts the bytes of the
//! destination buffer reduced per second.

use half::{bf16, f16};
use rankmesh::internals::reduce::{reduce_slice, Reducible};
use rankmesh::ReduceOp;
use std::time::Instant;

fn run<T: Reducible + Default>(name: &str, one: T) {
    let n = (1 << 20) / std::mem::size_of::<T>();
    let src = vec![one; n];
    for op in [ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Min, ReduceOp::Max] {
        let mut dst = vec![T::default(); n];
        for _ in 0..50 {
            reduce_slice(op, &mut dst, &src);
        }
        let iters = 2000;
        let t = Instant::now();
        for _ in 0..iters {
            reduce_slice(
                op,
                std::hint::black_box(&mut dst),
                std::hint::black_box(&src),
            );
        }
        let gbs = (iters * (1 << 20)) as f64 / t.elapsed().as_secs_f64() / 1e9;
        println!("{name:>5} {op:?}: {gbs:.1} GB/s");
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    run::<f32>("f32", 1.0);
    run::<f64>("f64", 1.0);
    run::<f16>("f16", f16::ONE);
    run::<bf16>("bf16", bf16::ONE);
    run::<i32>("i32", 1);
    run::<u8>("u8", 1);
    run::<i64>("i64", 1);
}
