#!/usr/bin/env bash
# A/B of two trees on one GPU, old and new interleaved on the same machine in one sequence of processes:
# batch-1 decode tok/s (bench.latency), the Mosaic prefill kernel's TFLOP/s at the 8B attention shape
# (bench.kernels_mgpu --only prefill) and offline 1000 x 512/256 output tok/s (bench.throughput), each at
# the engine's defaults (no kernel flags). This tree is "new"; $OLD is a checkout of the old one.
#
#   mkdir -p .ab/old && git archive <old-rev> | tar -x -C .ab/old      # a plain copy of the old tree
#   OLD=.ab/old OUT=/some/dir [OLD_REV=<old-rev> NEW_REV=<new-rev>] bash bench/ab_main.sh
#
# Writes into $OUT (at most 3 files): ab_main_summary.json (device, versions, each figure old / new and
# new/old, every step's command, exit status and wall time), ab_main.log (every step's output) and
# ab_raw.tgz (the steps' own JSONs). Each tree compiles into its own JAX_COMPILATION_CACHE_DIR
# (.ab/jax_cache/{old,new} under this tree, kept between calls on a warm machine). The whole run stays
# under BUDGET_S seconds (default 530): each step is capped by its own limit and by what is left of the
# budget, so a slow step costs the later ones, never the summary. STEPS (default "latency throughput
# prefill") picks and orders the steps; each runs old, then new. Exit status 0 only if every step ran
# and the three figures have both sides.
set -u
cd "$(dirname "$0")/.."
NEW=$(pwd -P)
: "${OLD:?set OLD to a checkout of the old tree (e.g. .ab/old)}"
: "${OUT:?set OUT to the output directory}"
[ -f "$OLD/bench/latency.py" ] || { echo "OLD=$OLD: no bench/latency.py there" >&2; exit 2; }
OLD=$(cd "$OLD" && pwd -P)
[ "$OLD" != "$NEW" ] || { echo "OLD is this tree itself ($NEW)" >&2; exit 2; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUDGET_S=${BUDGET_S:-530}
STEPS=${STEPS:-latency throughput prefill}
for name in $STEPS; do
  case $name in
    latency | throughput | prefill) ;;
    *) echo "STEPS: unknown step '$name' (expected latency, throughput, prefill)" >&2; exit 2 ;;
  esac
done
RESERVE_S=25              # kept back for the summary and a step's kill grace (timeout -k 10)
CACHE=${AB_CACHE:-$NEW/.ab/jax_cache}   # AB_CACHE: elsewhere (tests)
RAW=$(mktemp -d)
LOG=$OUT/ab_main.log
COMMAND="OLD=$OLD OUT=$OUT BUDGET_S=$BUDGET_S STEPS='$STEPS' bash bench/ab_main.sh"
# Optional labels recorded in the summary, e.g. OLD_REV=$(git rev-parse main~1) (a copy has no git).
REVS="old=${OLD_REV:-unknown} new=${NEW_REV:-unknown}"
: >"$LOG"
: >"$RAW/steps.tsv"

say() { echo "$*" | tee -a "$LOG"; }

say "=== $COMMAND; new = $NEW, old = $OLD; $(date -u +%FT%TZ)"
# Each tree must import its own packages (PYTHONPATH=. ahead of any installed copy), or the A/B is void.
for side in old new; do
  tree=$OLD
  [ "$side" = new ] && tree=$NEW
  rev="no git checkout of its own"
  [ -e "$tree/.git" ] && rev=$(git -C "$tree" rev-parse HEAD 2>&1)
  got=$(cd "$tree" && PYTHONPATH=. python -c "import jpaged; print(jpaged.__file__)" 2>>"$LOG" | tail -n 1)
  say "tree $side = $tree (git: $rev), imports jpaged from $got"
  case $got in
    "$tree"/*) ;;
    *) say "the $side tree does not import its own jpaged: stopping"; exit 2 ;;
  esac
done
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >>"$LOG" 2>&1

step() {  # step NAME SIDE LIMIT MODULE ARGS...: python -m MODULE ARGS in the SIDE tree, under a timeout
  local name=$1 side=$2 cap=$3
  shift 3
  local tree=$OLD
  [ "$side" = new ] && tree=$NEW
  local left=$((BUDGET_S - SECONDS - RESERVE_S))
  local limit=$((cap < left ? cap : left))
  local cmd="cd $tree && PYTHONPATH=. JAX_COMPILATION_CACHE_DIR=$CACHE/$side timeout -k 10 $limit python -m $*"
  if [ "$limit" -lt 30 ]; then
    say "=== $name $side skipped: ${left} s of the budget left"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$side" 125 0 "$limit" "$cmd" >>"$RAW/steps.tsv"
    return
  fi
  say "=== $name $side (${SECONDS} s into the run): $cmd"
  mkdir -p "$CACHE/$side"
  local t0=$SECONDS
  (cd "$tree" && PYTHONPATH=. JAX_COMPILATION_CACHE_DIR="$CACHE/$side" timeout -k 10 "$limit" python -m "$@") >>"$LOG" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$side" "$rc" "$((SECONDS - t0))" "$limit" "$cmd" >>"$RAW/steps.tsv"
  say "=== $name $side: exit $rc after $((SECONDS - t0)) s"
}

# Limits from the recorded runs: a Llama-3-8B step compiles in ~9 s per token bucket (7 buckets at 2,048
# tokens per step, 4 at 256), the offline run takes ~26 s after a warm-up run of 512 requests, the
# prefill section compiles 9 kernel configs and imports torch. Expected: latency ~60 s, prefill ~55 s,
# throughput ~120 s per tree, ~7.5 minutes in all with cold compile caches. --max-num-batched-tokens 256
# leaves the measured decode steps as they are (the 4- and 64-token buckets; the 128-token prompt still
# fills one 256-token bucket) and compiles 3 buckets fewer.
LATENCY=(bench.latency --model llama3-8b --max-num-batched-tokens 256)
# bench.latency measures the copy ceiling through torch too, which needs memory JAX has not preallocated.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PREFILL=(bench.kernels_mgpu --only prefill --out "$RAW")
THROUGHPUT=(bench.throughput --model llama3-8b --workloads fixed)
# The prefill kernel's figure goes last: it is the quickest to re-run alone (STEPS=prefill) if the budget cuts it.
for name in $STEPS; do
  for side in old new; do
    case $name in
      latency) step latency "$side" 100 "${LATENCY[@]}" --out "$RAW/latency_$side.json" ;;
      throughput) step throughput "$side" 200 "${THROUGHPUT[@]}" --out "$RAW/throughput_$side.json" ;;
      prefill) step kernels_mgpu_prefill "$side" 90 "${PREFILL[@]}" --tag "_prefill_$side" ;;
    esac
  done
done

say "=== summary (${SECONDS} s into the run)"
python "$NEW/bench/ab_summary.py" "$RAW" "$OUT/ab_main_summary.json" --command "$COMMAND" --revisions "$REVS" 2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
tar czf "$OUT/ab_raw.tgz" -C "$RAW" .
rm -rf "$RAW"
say "=== done in ${SECONDS} s, exit $status"
exit "$status"
