/*
 * The Open MPI side of scripts/compare-mpi.sh: the collectives collbench
 * times, measured the way collbench measures them, printed in collbench's
 * table columns so that one parser reads both.
 *
 *   mpirun -np N mpi_collbench COLLS MINBYTES MAXBYTES FACTOR ITERS WARMUP BATCHES
 *
 * COLLS is a comma list of allreduce, broadcast, reduce, allgather,
 * reducescatter, alltoall, barrier, sendrecv, pingpong. Elements are
 * floats, reductions sums, roots rank 0. ITERS 0 picks the count per size
 * as collbench's -n 0 does. A row's time is the mean over ITERS on each
 * rank, the maximum over ranks, the median over BATCHES. Sizes split in
 * one block per rank (allgather, reducescatter, alltoall) are rounded
 * down to whole blocks, as collbench does.
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int rank, nranks;

static long iters_for(long bytes, long iters) {
    if (iters > 0) return iters;
    if (bytes <= 4096) return 500;
    if (bytes <= 1048576) return 50;
    if (bytes <= 16777216) return 6;
    return 2;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int blocked(const char *c) {
    return !strcmp(c, "allgather") || !strcmp(c, "reducescatter") || !strcmp(c, "alltoall");
}

static double bus_factor(const char *c) {
    double p = nranks;
    if (!strcmp(c, "allreduce")) return 2.0 * (p - 1.0) / p;
    if (blocked(c)) return (p - 1.0) / p;
    return 1.0;
}

/* One iteration of `c` on `count` floats (the total for blocked ones);
 * returns its time in seconds. */
static double once(const char *c, long count, float *send, float *recv) {
    long m = blocked(c) ? count / nranks : count;
    int right = (rank + 1) % nranks, left = (rank + nranks - 1) % nranks;
    double t = MPI_Wtime();
    if (!strcmp(c, "allreduce")) {
        MPI_Allreduce(send, recv, (int)count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    } else if (!strcmp(c, "broadcast")) {
        MPI_Bcast(recv, (int)count, MPI_FLOAT, 0, MPI_COMM_WORLD);
    } else if (!strcmp(c, "reduce")) {
        MPI_Reduce(send, recv, (int)count, MPI_FLOAT, MPI_SUM, 0, MPI_COMM_WORLD);
    } else if (!strcmp(c, "allgather")) {
        MPI_Allgather(send, (int)m, MPI_FLOAT, recv, (int)m, MPI_FLOAT, MPI_COMM_WORLD);
    } else if (!strcmp(c, "reducescatter")) {
        MPI_Reduce_scatter_block(send, recv, (int)m, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    } else if (!strcmp(c, "alltoall")) {
        MPI_Alltoall(send, (int)m, MPI_FLOAT, recv, (int)m, MPI_FLOAT, MPI_COMM_WORLD);
    } else if (!strcmp(c, "barrier")) {
        MPI_Barrier(MPI_COMM_WORLD);
    } else if (!strcmp(c, "sendrecv")) {
        MPI_Sendrecv(send, (int)count, MPI_FLOAT, right, 0, recv, (int)count, MPI_FLOAT, left, 0,
                     MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    } else if (!strcmp(c, "pingpong")) {
        if (rank == 0) {
            MPI_Send(send, (int)count, MPI_FLOAT, 1, 1, MPI_COMM_WORLD);
            MPI_Recv(recv, (int)count, MPI_FLOAT, 1, 2, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        } else if (rank == 1) {
            MPI_Recv(recv, (int)count, MPI_FLOAT, 0, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            MPI_Send(recv, (int)count, MPI_FLOAT, 0, 2, MPI_COMM_WORLD);
        }
        return (MPI_Wtime() - t) / 2.0;
    } else {
        if (rank == 0) fprintf(stderr, "mpi_collbench: unknown collective %s\n", c);
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    return MPI_Wtime() - t;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    if (argc != 8) {
        if (rank == 0)
            fprintf(stderr, "usage: %s COLLS MINBYTES MAXBYTES FACTOR ITERS WARMUP BATCHES\n",
                    argv[0]);
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    long lo = atol(argv[2]), hi = atol(argv[3]), f = atol(argv[4]);
    long iters = atol(argv[5]), warmup = atol(argv[6]), batches = atol(argv[7]);
    if (f < 2 || batches < 1 || lo > hi) {
        if (rank == 0) fprintf(stderr, "mpi_collbench: bad sizes or counts\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    /* The largest buffer: a block per rank of the largest size, or the size. */
    size_t cap = (size_t)hi / sizeof(float) + 1;
    float *send = malloc(cap * sizeof(float)), *recv = malloc(cap * sizeof(float));
    double *times = malloc((size_t)batches * sizeof(double));
    if (!send || !recv || !times) MPI_Abort(MPI_COMM_WORLD, 1);
    for (size_t i = 0; i < cap; i++) send[i] = (float)((rank + i) % 3), recv[i] = 0;

    char *colls = strdup(argv[1]);
    for (char *c = strtok(colls, ","); c; c = strtok(NULL, ",")) {
        if (!strcmp(c, "pingpong") && nranks < 2) {
            if (rank == 0) fprintf(stderr, "mpi_collbench: pingpong needs 2 ranks\n");
            MPI_Abort(MPI_COMM_WORLD, 2);
        }
        int bar = !strcmp(c, "barrier");
        for (long bytes = bar ? 0 : lo; bytes <= (bar ? 0 : hi); bytes = bytes ? bytes * f : f) {
            long count = bytes / (long)sizeof(float);
            if (blocked(c)) count -= count % nranks;
            long n = iters_for(count * (long)sizeof(float), iters);
            for (long w = 0; w < warmup; w++) once(c, count, send, recv);
            for (long b = 0; b < batches; b++) {
                double spent = 0, per;
                for (long i = 0; i < n; i++) spent += once(c, count, send, recv);
                per = spent / (double)n;
                MPI_Allreduce(MPI_IN_PLACE, &per, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
                times[b] = per;
            }
            qsort(times, (size_t)batches, sizeof(double), cmp_double);
            double t = times[batches / 2];
            double algbw = (double)(count * (long)sizeof(float)) / t / 1e9;
            if (rank == 0) {
                int reduces = !strcmp(c, "allreduce") || !strcmp(c, "reduce") ||
                              !strcmp(c, "reducescatter");
                int rooted = !strcmp(c, "broadcast") || !strcmp(c, "reduce");
                printf("  %11ld %12ld %9s %6s %5d %10.2f %8.3f %8.3f %7s  %s\n",
                       count * (long)sizeof(float), count, "float", reduces ? "sum" : "none",
                       rooted ? 0 : -1, t * 1e6, algbw, algbw * bus_factor(c), "N/A", c);
                fflush(stdout);
            }
            if (bar) break;
        }
    }
    free(colls);
    free(send);
    free(recv);
    free(times);
    MPI_Finalize();
    return 0;
}
