#!/usr/bin/env bash
# AOTInductor packages on the GPU, random weights: build time, file size, load time in a fresh
# process, and `matchrt bench` next to eager fp32 and torch.compile + CUDA graphs.
#
#   scripts/inductor_gpu_measure.sh OUT_DIR MATCHER [all|build|bench]
#
# MATCHER: eloftr (fp16, 832 x 832) or roma_plus (fp16, 560 coarse / 864 upsampling, the defaults).
# Each invocation stops its steps at a 530 s budget (the device allows 10 min a command), so run
#   scripts/inductor_gpu_measure.sh "$OUT/ind" eloftr          # build + load + bench, ~6 min
#   scripts/inductor_gpu_measure.sh "$OUT/ind" roma_plus build # build + load (compile time unknown)
#   scripts/inductor_gpu_measure.sh "$OUT/ind" roma_plus bench # on the same warm machine: reuses it
# Packages go to $MATCHRT_INDUCTOR_WORK (default .inductor-work, git-ignored, so it stays on the
# device machine between calls) under the name `matchrt bench` gives them, so the bench reuses
# the package built here (provenance match) instead of compiling again. OUT_DIR gets logs, the
# provenance records, load.json, and the bench's JSON / Markdown / PNG.
# BUILD_MAX_S caps the build step (default 480 s).
# Needs matchrt importable (scripts/device_setup.sh, then PYTHONPATH=/tmp/site).
set -uo pipefail
export PYTHONFAULTHANDLER=1  # a crash in the loaded package prints where Python was
MATCHRT=(python3 -m matchrt.cli)
OUT=${1:?usage: $0 OUT_DIR MATCHER [all|build|bench]}
M=${2:?usage: $0 OUT_DIR MATCHER [all|build|bench]}
STEP=${3:-all}
WORK=${MATCHRT_INDUCTOR_WORK:-.inductor-work}
BUDGET=${BUDGET_S:-530}
case "$M" in
  eloftr) SIDE=832 ;;
  roma_plus) SIDE=560 ;;
  *) echo "MATCHER must be eloftr or roma_plus" >&2; exit 2 ;;
esac
mkdir -p "$OUT" "$WORK"
PKG="$WORK/$M-${SIDE}x${SIDE}-fp16-cuda.pt2"
START=$(date +%s)
log() { echo "[$(date +%T) +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/$M.log"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
run_step() {  # run_step NAME MAX_SECONDS CMD...: bounded by what is left of the budget
  local name=$1 max=$2; shift 2
  local t; t=$(left); (( t > max )) && t=$max
  if (( t < 20 )); then log "SKIPPED $name: budget spent"; return 1; fi
  log "$name (timeout ${t}s): $*"
  local s; s=$(date +%s)
  timeout "$t" "$@" > >(tee -a "$OUT/$M.$name.log") 2>&1
  local rc=$?
  log "$name: rc=$rc after $(( $(date +%s) - s ))s"
  return $rc
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nproc; } > "$OUT/$M.machine.txt" 2>&1
log "machine: $(tr '\n' ' ' < "$OUT/$M.machine.txt")"

if [[ "$STEP" == all || "$STEP" == build ]]; then
  run_step build "${BUILD_MAX_S:-480}" "${MATCHRT[@]}" build -m "$M" --random-weights --backend inductor --precision fp16 \
    --device cuda -o "$PKG"
  for f in "$PKG".json "$PKG".matchrt.json; do [[ -f "$f" ]] && cp "$f" "$OUT/"; done
  if [[ -f "$PKG" ]]; then
    log "package: $(du -h "$PKG" | cut -f1) ($(stat -c %s "$PKG") bytes); $(python3 -c \
      "import json,sys; r=json.load(open(sys.argv[1])); print('build_seconds:', r['build_seconds'], 'cxx:', r['build'].get('cxx'))" "$PKG.json")"
    # a fresh process: import, load (provenance check + aoti_load_package), first run, steady runs
    run_step load 120 python3 - "$PKG" "$OUT/$M.load.json" <<'EOF'
import json, statistics, sys, time
t0 = time.perf_counter()
import torch
from pathlib import Path
from matchrt.host import get_host
from matchrt.runner import artifact_pipeline
from matchrt.export import load_manifest
t1 = time.perf_counter()
pkg, out = Path(sys.argv[1]), sys.argv[2]
result = {"import_s": t1 - t0}
print(f"imports {t1 - t0:.1f} s", flush=True)
for variant, opts in (("inductor", {}), ("inductor-cudagraph", {"cuda_graph": True})):
    print(f"{variant}: loading", flush=True)
    s = time.perf_counter()
    pipe = artifact_pipeline(get_host(), pkg, "inductor", dict(opts, device="cuda"))
    loaded = time.perf_counter() - s
    stage = load_manifest(pkg)["stages"][0]
    inputs = {n: torch.rand(shape) for n, shape in stage["input_shapes"].items()}
    print(f"{variant}: loaded in {loaded:.1f} s; first run", flush=True)
    s = time.perf_counter(); pipe.run(inputs); torch.cuda.synchronize(); first = time.perf_counter() - s
    times = []
    for _ in range(30):
        torch.cuda.synchronize(); s = time.perf_counter(); pipe.run(inputs); torch.cuda.synchronize()
        times.append((time.perf_counter() - s) * 1000)
    print(f"{variant}: first run {first:.2f} s, median {statistics.median(times):.2f} ms", flush=True)
    result[variant] = {"load_s": loaded, "first_run_s": first, "run_ms_median": statistics.median(times),
                       "run_ms_min": min(times)}
    del pipe
result["gpu"] = torch.cuda.get_device_name(0)
result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
print(json.dumps(result, indent=1))
Path(out).write_text(json.dumps(result, indent=1))
EOF
  fi
fi

if [[ "$STEP" == all || "$STEP" == bench ]]; then
  COMMON=(-m "$M" --random-weights --workdir "$WORK" --device cuda --synthetic 4)
  # the eager fp32 reference row (the bench compares every row with eager fp32 internally as well)
  run_step bench_fp32 150 "${MATCHRT[@]}" bench "${COMMON[@]}" --backend torch --precision fp32 --runs 30 \
    --warmup 5 --json "$OUT/$M.bench_fp32.json" --markdown "$OUT/$M.bench_fp32.md" \
    --plot "$OUT/$M.bench_fp32.png"
  # the compiled rows in fp16; the inductor rows reuse the package built above (else build it)
  run_step bench_fp16 480 "${MATCHRT[@]}" bench "${COMMON[@]}" \
    --backend torch-compile-cudagraph,inductor,inductor-cudagraph --precision fp16 --runs 30 --warmup 10 \
    --json "$OUT/$M.bench_fp16.json" --markdown "$OUT/$M.bench_fp16.md" --plot "$OUT/$M.bench_fp16.png"
fi
log "done"
