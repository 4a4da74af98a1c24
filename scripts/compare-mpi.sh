#!/usr/bin/env bash
# rankmesh's collbench against Open MPI on this host, same collectives,
# same sizes, same measurement, interleaved rounds; one table of ratios.
#
#   scripts/compare-mpi.sh [--np N] [--transport shm|tcp] [--rounds R]
#                          [--coll LIST] [-b MIN] [-e MAX] [-f F]
#                          [-n ITERS] [-w WARMUP] [--batches B]
#
# --transport shm (default): each system's same-host path (rankmesh's
#   default, Open MPI's shared memory).
# --transport tcp: the path ranks on different hosts take (rankmesh over
#   QUIC only, RANKMESH_SAME_HOST=0; Open MPI over TCP on loopback).
# Defaults: --np 4 --rounds 3 --coll allreduce,broadcast,barrier -b 4
#   -e 64M -f 16 -n 0 (iterations by size) -w 2 --batches 3. Elements are
#   floats, reductions sums, roots rank 0.
#
# Needs Open MPI's compiler wrapper and launcher (Debian: openmpi-bin and
# libopenmpi-dev, installed here when missing and run as root) and a C
# compiler. collbench is taken from $COLLBENCH, else built in release from
# this checkout, else found on PATH (`cargo install --path launcher`).
# The Open MPI side is scripts/mpi_collbench.c, compiled on first use.
set -euo pipefail

np=4 transport=shm rounds=3 colls=allreduce,broadcast,barrier
lo=4 hi=64M f=16 iters=0 warmup=2 batches=3
die() { echo "compare-mpi: $*" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench-common.sh
. "$here/bench-common.sh"
while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || die "$1 needs a value (see the top of $0)"
  case $1 in
    --transport) transport=$2 ;;
    *) common_option "$1" "$2" || die "unknown option $1 (see the top of $0)" ;;
  esac
  shift 2
done
case $transport in shm | tcp) ;; *) die "--transport $transport: expected shm or tcp" ;; esac
for v in "$np" "$rounds" "$f" "$iters" "$warmup" "$batches"; do
  [[ $v =~ ^[0-9]+$ ]] || die "$v is not a whole number"
done
[ "$rounds" -ge 1 ] && [ "$np" -ge 1 ] || die "--np and --rounds must be at least 1"
lo=$(bytes "$lo")
hi=$(bytes "$hi")
IFS=, read -r -a list <<<"$colls"
for c in "${list[@]}"; do
  case $c in
    allreduce | broadcast | reduce | allgather | reducescatter | alltoall | barrier | sendrecv | pingpong) ;;
    *) die "--coll $c: expected allreduce, broadcast, reduce, allgather, reducescatter, alltoall, barrier, sendrecv or pingpong" ;;
  esac
done

# Open MPI (Debian names its wrappers *.openmpi).
mpicc=$(command -v mpicc.openmpi || command -v mpicc || true)
mpirun=$(command -v mpirun.openmpi || command -v mpirun || true)
if [ -z "$mpicc" ] || [ -z "$mpirun" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "compare-mpi: installing Open MPI (openmpi-bin libopenmpi-dev)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null
    mpicc=$(command -v mpicc.openmpi || command -v mpicc)
    mpirun=$(command -v mpirun.openmpi || command -v mpirun)
  else
    die "Open MPI is missing: install it (Debian: sudo apt-get install openmpi-bin libopenmpi-dev)"
  fi
fi
cache=${TMPDIR:-/tmp}/rankmesh-compare-mpi-$(id -u)
mkdir -p "$cache"
mpibench=$cache/mpi_collbench
if [ ! -x "$mpibench" ] || [ "$here/mpi_collbench.c" -nt "$mpibench" ]; then
  "$mpicc" -O2 -o "$mpibench" "$here/mpi_collbench.c"
fi

# collbench.
if [ -n "${COLLBENCH:-}" ]; then
  cb=$COLLBENCH
elif [ -f "$here/../launcher/Cargo.toml" ] && command -v cargo >/dev/null; then
  (cd "$here/.." && cargo build --release --quiet -p rankmesh-launcher --bin collbench)
  cb=$(cd "$here/.." && cargo metadata --format-version 1 --no-deps 2>/dev/null |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release/collbench
else
  cb=$(command -v collbench) || die "no collbench: set COLLBENCH, or cargo install --path launcher"
fi
[ -x "$cb" ] || die "collbench not found at $cb"

mpiflags=(--allow-run-as-root)
[ "$np" -gt "$(nproc)" ] && mpiflags+=(--oversubscribe)
rmenv=()
if [ "$transport" = tcp ]; then
  mpiflags+=(--mca pml ob1 --mca btl tcp,self --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo)
  rmenv=(RANKMESH_SAME_HOST=0)
fi

rows=$cache/rows.$$
trap 'rm -f "$rows" "$rows".*' EXIT
: >"$rows"
for r in $(seq 1 "$rounds"); do
  echo "compare-mpi: round $r of $rounds: collbench, then Open MPI ($np ranks, $transport)" >&2
  env "${rmenv[@]}" "$cb" --np "$np" --coll "$colls" -b "$lo" -e "$hi" -f "$f" -n "$iters" \
    -w "$warmup" --batches "$batches" -c 1 >"$rows.cb" ||
    { cat "$rows.cb" >&2; die "collbench failed (its output is above)"; }
  keep rankmesh <"$rows.cb" >>"$rows"
  "$mpirun" "${mpiflags[@]}" -np "$np" "$mpibench" "$colls" "$lo" "$hi" "$f" "$iters" \
    "$warmup" "$batches" >"$rows.mpi" ||
    { cat "$rows.mpi" >&2; die "the Open MPI run failed (its output is above)"; }
  keep openmpi <"$rows.mpi" >>"$rows"
done

echo "# collbench against Open MPI on $(hostname): $np ranks, $transport, float sum, $(nproc) cores"
echo "# median of $rounds interleaved rounds; speed = Open MPI's time / rankmesh's (above 1: rankmesh is faster)"
ratio_table "$colls" "$rows"
