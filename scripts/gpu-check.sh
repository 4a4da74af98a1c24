#!/usr/bin/env bash
# The hardware check of the GPU backends, in two halves.
#
#   scripts/gpu-check.sh build DIR   # here: release binaries + loader into DIR
#   DIR/gpu-check.sh run DIR         # on a GPU host (no network, no Rust)
#
# `build` compiles, in release with the `cuda` and `wgpu` features, the
# gpu_cuda and gpu_wgpu test binaries, collbench and rankrun, strips them
# (keeping compressed debug info for backtraces where it fits) and puts them
# in DIR with this script, scripts/gloo_bench.py and Debian's Vulkan loader
# packages (NVIDIA hosts often have the driver's Vulkan ICD but no loader).
#
# `run` needs only the NVIDIA driver (with its Vulkan ICD), NVRTC and DIR:
#   1. the gpu_cuda grid, 2. the gpu_wgpu grid,
#   3. large messages: collbench --device cuda, allreduce and broadcast of
#      64 and 256 MiB on 2, 4 and 8 processes, every element checked,
#   4. collbench --device cuda / wgpu / host at 1, 16, 64, 256 MiB on
#      2, 4, 8 processes, and torch Gloo on CUDA tensors where torch imports.
# Every stage has its own timeout; a summary is printed at the end, also
# after a failure. The whole run stays under 8 minutes.
set -uo pipefail

mode=${1:-}
dir=${2:-}
if [ -z "$mode" ] || [ -z "$dir" ]; then
  echo "usage: $0 build DIR | $0 run DIR" >&2
  exit 2
fi

if [ "$mode" = build ]; then
  set -e
  cd "$(dirname "$0")/.."
  mkdir -p "$dir/bin" "$dir/debs"
  feats="cuda wgpu"
  exe_of() { # the executable cargo reports for a target name
    grep -o "($2-[^)]*)\|(target/[^)]*/$2-[0-9a-f]*)" "$1" | tr -d '()' | tail -1
  }
  log=$(mktemp)
  cargo test --release --locked --features "$feats" --test gpu_cuda --test gpu_wgpu --no-run 2>&1 | tee "$log"
  cargo build --release --locked -p rankmesh-launcher --features "$feats" --bins 2>&1 | tail -1
  for t in gpu_cuda gpu_wgpu; do
    src=$(exe_of "$log" "$t")
    [ -n "$src" ] || { echo "no executable found for $t" >&2; exit 1; }
    cp "$src" "$dir/bin/$t"
  done
  cp target/release/rankrun target/release/collbench "$dir/bin/"
  for f in "$dir"/bin/*; do
    objcopy --compress-debug-sections=zlib "$f" 2>/dev/null || true
    # Keep the files small enough to travel: drop debug info if need be.
    if [ "$(stat -c %s "$f")" -gt $((15 << 20)) ]; then strip --strip-debug "$f"; fi
  done
  cp scripts/gpu-check.sh scripts/gloo_bench.py "$dir/"
  (cd "$dir/debs" && for p in libvulkan1 libglvnd0 libegl1 libglx0 libgl1 libopengl0; do
     apt-get download "$p" >/dev/null 2>&1 || echo "note: could not download $p"; done)
  rm -f "$log"
  du -sh "$dir"
  exit 0
fi

[ "$mode" = run ] || { echo "unknown mode $mode" >&2; exit 2; }
cd "$dir" || exit 2
dir=$(pwd)
out=${OUT:-$dir/out}
mkdir -p "$out"
summary=$out/summary.txt
: >"$summary"
start=$(date +%s)
note() { echo "$*" | tee -a "$summary"; }
stage() { # stage NAME TIMEOUT CMD...: run with a timeout, log, record the outcome
  local name=$1 limit=$2
  shift 2
  local t0 rc
  t0=$(date +%s)
  echo "=== $name (timeout ${limit}s)"
  timeout -k 5 "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  local took=$(($(date +%s) - t0))
  case $rc in
    0) note "PASS    $name (${took}s)" ;;
    124 | 137) note "TIMEOUT $name (${took}s)" ;;
    *) note "FAIL    $name (exit $rc, ${took}s)" ;;
  esac
  tail -n 40 "$out/$name.log"
  return 0
}
finish() {
  echo
  echo "================ summary ($(($(date +%s) - start))s) ================"
  cat "$summary"
}
trap finish EXIT

# The Vulkan loader, where the host has none.
if ! ldconfig -p 2>/dev/null | grep -q 'libvulkan.so.1'; then
  for f in debs/*.deb; do [ -e "$f" ] && dpkg -x "$f" /; done
  ldconfig
fi
icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [ -z "${VK_DRIVER_FILES:-}" ] && [ -e "$icd" ]; then export VK_DRIVER_FILES=$icd; fi
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-$(mktemp -d)}
chmod 0700 "$XDG_RUNTIME_DIR"
export RUST_BACKTRACE=1

note "host: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1); $(nproc) cores"
note "nvrtc: $(ldconfig -p 2>/dev/null | grep -o 'libnvrtc[^ ]*' | sort -u | tr '\n' ' ')"

# 1-2: the test grids (CI=true: a missing device fails instead of skipping).
CI=true stage cuda-grid 120 bin/gpu_cuda --test-threads 1
grep -h "test result" "$out/cuda-grid.log" | sed 's/^/        /' | tee -a "$summary"
CI=true stage wgpu-grid 120 bin/gpu_wgpu --test-threads 1
grep -h "test result" "$out/wgpu-grid.log" | sed 's/^/        /' | tee -a "$summary"

bench() { # bench NAME NP DEVICE MINBYTES MAXBYTES [extra...]
  local name=$1 np=$2 device=$3 lo=$4 hi=$5
  shift 5
  stage "$name" 60 bin/collbench --np "$np" --device "$device" --coll allreduce,broadcast \
    -b "$lo" -e "$hi" -f 4 -n 0 -w 2 --batches 3 "$@"
  # table rows: size count type redop root time algbw busbw #wrong coll
  awk -v tag="$name" '$1 !~ /^#/ && $NF ~ /allreduce|broadcast/ {
      printf "        %-22s %-9s %11s B  busbw %7s GB/s  wrong %s\n", tag, $NF, $1, $8, $9 }' \
    "$out/$name.log" | tee -a "$summary"
}

# 3: large messages on the device, results checked (#wrong must be 0).
for np in 2 4 8; do
  bench "cuda-large-np$np" "$np" cuda 64M 256M
done

# 4: device against host path (and Gloo) at 1 and 16 MiB (64 and 256 MiB
# device figures come from stage 3).
for np in 2 4 8; do
  bench "host-np$np" "$np" host 1M 256M
  bench "cuda-np$np" "$np" cuda 1M 16M
  bench "wgpu-np$np" "$np" wgpu 1M 64M
  stage "gloo-np$np" 60 python3 gloo_bench.py "$np" 1048576,16777216,67108864,268435456 2
  grep -h "gloo-cuda" "$out/gloo-np$np.log" | sed 's/^/        /' | tee -a "$summary"
done

wrong=$(grep -h "wrong" "$summary" | awk '$NF != 0 && $NF ~ /^[0-9]+$/' | wc -l)
note "rows with wrong elements: $wrong"
if grep -q "^FAIL\|^TIMEOUT" "$summary" || [ "$wrong" -ne 0 ]; then
  exit 1
fi
