#!/usr/bin/env python3
"""torch.distributed with Gloo on CUDA tensors: allreduce and broadcast
busbw, for side-by-side figures with `collbench --device cuda`.

    python3 scripts/gloo_bench.py NP SIZE_BYTES[,SIZE_BYTES...]

One process per rank on one host, all on cuda:0 (as collbench's ranks share
one GPU). Per size: 2 warm-up iterations, then batches; a batch's time per
iteration is the maximum over ranks, the reported time the median over
batches. busbw factors as nccl-tests (allreduce 2(p-1)/p, broadcast 1).
"""
import os
import statistics
import sys
import time


def iters_for(size):
    if size <= 1 << 20:
        return 20
    if size <= 16 << 20:
        return 6
    return 2


def rank_main(rank, np_, sizes, port, batches):
    import torch
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=np_)
    dev = torch.device("cuda:0")
    for op in ("allreduce", "bcast"):
        for size in sizes:
            n = size // 4
            x = torch.full((n,), float(rank + 1), device=dev, dtype=torch.float32)
            times = []
            for batch in range(batches + 1):
                iters = iters_for(size)
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(iters):
                    if op == "allreduce":
                        dist.all_reduce(x)
                    else:
                        dist.broadcast(x, 0)
                torch.cuda.synchronize()
                per = torch.tensor([(time.perf_counter() - t) / iters])
                dist.all_reduce(per, op=dist.ReduceOp.MAX)
                if batch > 0:
                    times.append(per.item())
            t = statistics.median(times)
            factor = 2 * (np_ - 1) / np_ if op == "allreduce" else 1.0
            algbw = size / t / 1e9
            if rank == 0:
                print(f"gloo-cuda np={np_} {op:9} {size:>11} bytes  {t * 1e6:10.1f} us  "
                      f"algbw {algbw:7.3f}  busbw {algbw * factor:7.3f}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main():
    if len(sys.argv) < 3:
        sys.exit("usage: gloo_bench.py NP SIZE_BYTES[,SIZE_BYTES...] [BATCHES]")
    np_ = int(sys.argv[1])
    sizes = [int(s) for s in sys.argv[2].split(",")]
    batches = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    try:
        import torch
        import torch.multiprocessing as mp
    except Exception as e:  # noqa: BLE001 - any import failure means no column
        print(f"gloo-cuda: torch does not import here ({e}); no Gloo column")
        return
    if not torch.cuda.is_available():
        print("gloo-cuda: torch sees no CUDA device; no Gloo column")
        return
    port = 29500 + os.getpid() % 1000
    mp.spawn(rank_main, args=(np_, sizes, port, batches), nprocs=np_, join=True)


if __name__ == "__main__":
    main()
