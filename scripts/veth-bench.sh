#!/usr/bin/env bash
# rankmesh's cross-host path against Open MPI over TCP, with every rank on a
# "host" of its own: one network namespace per rank, each joined to a
# bridge by a veth pair at the given MTU. Same collectives, same sizes,
# same measurement, interleaved rounds; one table.
#
#   sudo scripts/veth-bench.sh [--np N] [--mtu M] [--rounds R] [--coll LIST]
#                              [-b MIN] [-e MAX] [-f F] [-n ITERS] [-w WARMUP]
#                              [--batches B] [--threads T]
#
# Defaults: --np 4 --mtu 9000 --rounds 3 --coll allreduce,barrier -b 4
# -e 64M -f 16 -n 0 -w 2 --batches 3. rankmesh runs under rankrun with
# `ip netns exec` as its launch agent (QUIC between namespaces: the
# same-host channel needs one namespace), its path-MTU discovery allowed
# up to the link's MTU (RANKMESH_MTU); Open MPI runs under mpirun with
# an rsh agent that enters the rank's namespace, TCP only (`--mca btl
# tcp,self`). The namespaces, veth pairs and bridge are created here and
# removed on exit. Needs root, iproute2, Open MPI (openmpi-bin,
# libopenmpi-dev) and a C compiler; collbench and rankrun are taken from
# $COLLBENCH and $RANKRUN, else built in release from this checkout;
# $MPIRUN_FLAGS are added to mpirun's command line. --threads sets each
# rank's transport threads (RANKMESH_TRANSPORT_THREADS); the default is
# this machine's cores divided by the ranks, 1 to 4, because the
# namespaces share the cores (each rank would otherwise take every core of
# the machine as its host's own).
set -euo pipefail

np=4 mtu=9000 rounds=3 colls=allreduce,barrier
lo=4 hi=64M f=16 iters=0 warmup=2 batches=3 threads=
die() { echo "veth-bench: $*" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench-common.sh
. "$here/bench-common.sh"
while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || die "$1 needs a value (see the top of $0)"
  case $1 in
    --mtu) mtu=$2 ;;
    --threads) threads=$2 ;;
    *) common_option "$1" "$2" || die "unknown option $1 (see the top of $0)" ;;
  esac
  shift 2
done
if [ -z "$threads" ] && [[ $np =~ ^[0-9]+$ ]] && [ "$np" -ge 1 ]; then
  threads=$(($(nproc) / np))
  [ "$threads" -ge 1 ] || threads=1
  [ "$threads" -le 4 ] || threads=4
fi
for v in "$np" "$mtu" "$rounds" "$f" "$iters" "$warmup" "$batches" "$threads"; do
  [[ $v =~ ^[0-9]+$ ]] || die "$v is not a whole number"
done
[ "$np" -ge 2 ] && [ "$np" -le 64 ] || die "--np must be 2 to 64"
[ "$mtu" -ge 1280 ] && [ "$mtu" -le 65535 ] || die "--mtu must be 1280 to 65535"
[ "$threads" -ge 1 ] && [ "$threads" -le 16 ] || die "--threads must be 1 to 16"
[ "$(id -u)" = 0 ] || die "needs root (it creates network namespaces)"
command -v ip >/dev/null || die "needs ip (Debian: apt-get install iproute2)"
lo=$(bytes "$lo")
hi=$(bytes "$hi")

mpicc=$(command -v mpicc.openmpi || command -v mpicc || true)
mpirun=$(command -v mpirun.openmpi || command -v mpirun || true)
[ -n "$mpicc" ] && [ -n "$mpirun" ] ||
  die "Open MPI is missing (Debian: apt-get install openmpi-bin libopenmpi-dev)"
# The namespaces: rmvb<pid>h (the bridge) and rmvb<pid>-<i> (rank i, address
# 10.231.<pid % 250>.<i + 1>); all of it goes on exit, whatever happens.
tag=rmvb$$
net=10.231.$(($$ % 250))
hub=${tag}h
ns() { echo "$tag-$1"; }
work=$(mktemp -d)
cleanup() {
  for i in $(seq 0 $((np - 1))); do
    ip netns del "$(ns "$i")" 2>/dev/null || true
    ip link del "v${tag}x$i" 2>/dev/null || true
  done
  ip netns del "$hub" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
mpibench=$work/mpi_collbench
"$mpicc" -O2 -o "$mpibench" "$here/mpi_collbench.c"
if [ -z "${COLLBENCH:-}" ] || [ -z "${RANKRUN:-}" ]; then
  (cd "$here/.." && cargo build --release --quiet -p rankmesh-launcher)
  dir=$(cd "$here/.." && cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release
fi
cb=${COLLBENCH:-$dir/collbench}
rr=${RANKRUN:-$dir/rankrun}
[ -x "$cb" ] && [ -x "$rr" ] || die "collbench or rankrun not found ($cb, $rr)"

ip netns add "$hub"
ip -n "$hub" link add br0 type bridge
ip -n "$hub" link set br0 mtu "$mtu" up
hosts=() mpihosts=$work/hosts
: >"$mpihosts"
for i in $(seq 0 $((np - 1))); do
  n=$(ns "$i")
  ip netns add "$n"
  ip link add "v${tag}x$i" type veth peer name "p${tag}x$i"
  ip link set "v${tag}x$i" netns "$n"
  ip link set "p${tag}x$i" netns "$hub"
  ip -n "$n" link set "v${tag}x$i" name eth0
  ip -n "$n" link set eth0 mtu "$mtu"
  ip -n "$n" addr add "$net.$((i + 1))/24" dev eth0
  ip -n "$n" link set eth0 up
  ip -n "$n" link set lo up
  ip -n "$hub" link set "p${tag}x$i" mtu "$mtu" master br0 up
  hosts+=("$n:1")
  echo "$net.$((i + 1)) slots=1" >>"$mpihosts"
done
# Open MPI's rsh agent: enter the namespace that owns the address.
cat >"$work/agent" <<EOF
#!/bin/sh
host=\$1; shift
exec ip netns exec "$tag-\$(( \${host##*.} - 1 ))" sh -c "\$*"
EOF
chmod +x "$work/agent"
IFS=, hostlist="${hosts[*]}"
unset IFS

# rankmesh's path-MTU discovery may go up to the link's MTU (less IPv6 and
# UDP headers); its default bound is 8952.
qmtu=$((mtu - 48 > 65000 ? 65000 : mtu - 48))
[ "$qmtu" -ge 1200 ] || qmtu=1200
yield=()
[ "$np" -gt "$(nproc)" ] && yield=(--mca mpi_yield_when_idle 1)
rows=$work/rows
: >"$rows"
for r in $(seq 1 "$rounds"); do
  echo "veth-bench: round $r of $rounds: rankmesh, then Open MPI ($np namespaces, MTU $mtu)" >&2
  ip netns exec "$(ns 0)" "$rr" --host "$hostlist" --launch-agent 'ip netns exec {host} sh -c' \
    --seed-addr "$net.1" -x RANKMESH_SAME_HOST=0 -x RANKMESH_MTU="$qmtu" \
    -x RANKMESH_TRANSPORT_THREADS="$threads" \
    "$cb" --coll "$colls" -b "$lo" -e "$hi" -f "$f" -n "$iters" -w "$warmup" \
    --batches "$batches" -c 1 >"$rows.cb" 2>"$rows.cberr" ||
    { cat "$rows.cb" "$rows.cberr" >&2; die "the rankmesh run failed (its output is above)"; }
  keep rankmesh <"$rows.cb" >>"$rows"
  # --bind-to none: each daemon sees a "host" of its own and would pin its
  # rank to core 0, so that all ranks shared one core (rankrun pins nothing).
  # For the same reason Open MPI cannot tell that more ranks than cores
  # share this machine; it is told (as it tells itself when oversubscribed
  # on one host), or its ranks spin through each other's time slices.
  ip netns exec "$(ns 0)" "$mpirun" --allow-run-as-root --hostfile "$mpihosts" -np "$np" --bind-to none \
    "${yield[@]}" \
    --mca plm_rsh_agent "$work/agent" --mca pml ob1 --mca btl tcp,self \
    --mca btl_tcp_if_include "$net.0/24" --mca oob_tcp_if_include "$net.0/24" \
    ${MPIRUN_FLAGS:-} "$mpibench" "$colls" "$lo" "$hi" "$f" "$iters" "$warmup" "$batches" >"$rows.mpi" 2>"$rows.mpierr" ||
    { cat "$rows.mpi" "$rows.mpierr" >&2; die "the Open MPI run failed (its output is above)"; }
  keep openmpi <"$rows.mpi" >>"$rows"
done

echo "# rankmesh (QUIC) against Open MPI (TCP): $np ranks, one network namespace each, veth at MTU $mtu, $(nproc) cores"
echo "# median of $rounds interleaved rounds; speed = Open MPI's time / rankmesh's (above 1: rankmesh is faster)"
ratio_table "$colls" "$rows"
