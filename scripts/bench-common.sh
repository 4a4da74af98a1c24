# Shared by scripts/compare-mpi.sh and scripts/veth-bench.sh (sourced; the
# caller defines die). Their common options, sizes, collbench/Open MPI
# rows, and the table of medians and ratios.

# The options both scripts take (see their tops): sets np, rounds, colls,
# lo, hi, f, iters, warmup or batches from option $1 and value $2; fails
# for any other option.
common_option() {
  case $1 in
    --np) np=$2 ;;
    --rounds) rounds=$2 ;;
    --coll) colls=$2 ;;
    -b) lo=$2 ;;
    -e) hi=$2 ;;
    -f) f=$2 ;;
    -n) iters=$2 ;;
    -w) warmup=$2 ;;
    --batches) batches=$2 ;;
    *) return 1 ;;
  esac
}

# 64M -> 67108864 (K, M, G: powers of 1024; leading zeros are decimal).
bytes() {
  local n=${1%[KkMmGg]} m=1
  case $1 in *[Kk]) m=1024 ;; *[Mm]) m=1048576 ;; *[Gg]) m=1073741824 ;; esac
  [[ $n =~ ^[0-9]+$ ]] || die "$1 is not a size"
  echo $((10#$n * m))
}

# Table rows (size count type redop root time algbw busbw #wrong coll) on
# stdin, rankrun's "[tag] " prefix allowed, as "WHO coll size time busbw".
keep() { awk -v who="$1" '{ sub(/^\[[^]]*\] /, "") } $1 !~ /^#/ && NF == 10 && $1 ~ /^[0-9]+$/ { print who, $10, $1, $6, $8 }'; }

# The medians over rounds of the rows in file $2 (from keep rankmesh and
# keep openmpi), one line per collective of the list $1 and size, with
# speed = Open MPI's time / rankmesh's.
ratio_table() {
  awk -v order="$1" '
  function median(s,   a, n, i, j, t) {
    n = split(s, a, " ")
    for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > t + 0; j--) a[j + 1] = a[j]; a[j + 1] = t }
    return a[int((n + 1) / 2)]
  }
  { k = $2 SUBSEP $3; t[$1, k] = t[$1, k] " " $4; b[$1, k] = b[$1, k] " " $5; if (!(k in seen)) { seen[k] = 1; keys[++nk] = k } }
  END {
    printf "# %-13s %11s %13s %13s %12s %12s %7s\n", "coll", "size(B)", "rankmesh(us)", "openmpi(us)", "rm busbw", "mpi busbw", "speed"
    n = split(order, cs, ",")
    for (c = 1; c <= n; c++) for (i = 1; i <= nk; i++) {
      split(keys[i], kk, SUBSEP); if (kk[1] != cs[c]) continue
      if (!(("rankmesh", keys[i]) in t) || !(("openmpi", keys[i]) in t)) continue
      rt = median(t["rankmesh", keys[i]]); mt = median(t["openmpi", keys[i]])
      printf "  %-13s %11s %13.2f %13.2f %12.3f %12.3f %7.2f\n", kk[1], kk[2], rt, mt,
        median(b["rankmesh", keys[i]]), median(b["openmpi", keys[i]]), (rt > 0 ? mt / rt : 0)
    }
  }' "$2"
}
