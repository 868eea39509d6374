#!/usr/bin/env bash
# `matchrt match-pairs` throughput on 1 and 2 GPUs: eloftr (random weights, 832 x 832) over the ten
# Sacre Coeur photographs copied COPIES times (COPIES=4: 40 images, 780 exhaustive pairs), once in one
# process (DataLoader workers) and on Ray Data with 1 and 2 GPU actors. Target: 2 GPUs >= 1.8 x 1 GPU.
# Then roma_plus (random weights) on one GPU over 77 sequential pairs, as a throughput figure.
# About 3-4 minutes on nvidia-h100-x2 (install ~30 s, each eloftr run ~40-60 s, roma_plus ~30 s).
#
# Two steps, from the repository root:
#   1. here (has PyPI):            bash scripts/pairs_scaling_gpu.sh carry [PYTHON_VERSION=3.12]
#      downloads what the GPU machine lacks into .whl/ (ignored by git): jsonschema,
#      jsonschema-specifications, referencing, rpds-py wheels and Ray 2.60. Ray's wheel (~80 MB) is
#      over the 64 MiB a device call carries, so it is unpacked, stripped of what this job never
#      imports (Java jars, the dashboard's web client, rllib, serve, tune, train, llm) and xz-packed
#      (~24 MB). h5py, pyarrow, pandas, typer, rich, onnx, opencv are on the GPU image already.
#      The GPU image's Python was 3.12 when last seen; `run` prints it: if it differs, redo step 1
#      with that version.
#   2. on nvidia-h100-x2 (carry .whl): [ROMA=0] bash scripts/pairs_scaling_gpu.sh run [COPIES=4] [BATCH=8]
#      writes $OUT/pairs_scaling.json (or /tmp/pairs_scaling/pairs_scaling.json) and prints a table.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}

if [ "$mode" = carry ]; then
    pyv=${2:-3.12}
    rm -rf .whl && mkdir -p .whl/dl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyv" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl/dl ray==2.60.0 jsonschema jsonschema-specifications referencing rpds-py
    mv .whl/dl/*.whl .whl/ && rm -rf .whl/dl
    tmp=$(mktemp -d)
    (cd "$tmp" && python3 -m zipfile -e "$OLDPWD"/.whl/ray-*.whl . \
        && rm -rf ray/jars ray/dashboard/client ray/rllib ray/serve ray/tune ray/train ray/llm \
        && chmod +x ray/core/src/ray/raylet/raylet ray/core/src/ray/gcs/gcs_server \
        && tar -cf - ray ray-*.dist-info | xz -9 -T0 > "$OLDPWD"/.whl/ray-trim.tar.xz)
    rm -rf "$tmp" .whl/ray-*.whl
    du -sh .whl/*
    exit 0
fi

copies=${2:-4}
batch=${3:-8}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 --version
python3 -c 'import torch; print("torch", torch.__version__, "GPUs:", torch.cuda.device_count())'
nvidia-smi -L || true
site=/tmp/site
mkdir -p "$site"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
tar -xJf .whl/ray-trim.tar.xz -C "$site"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | grep -v WARN || true
python3 -c 'import ray, ray.data, h5py, matchrt; print("ray", ray.__version__, "h5py", h5py.__version__)'

work=/tmp/pairs_scaling
rm -rf "$work" && mkdir -p "$work/images"
for c in $(seq 1 "$copies"); do
    for f in tests/data/sfm/sacre_coeur/*.jpg; do cp "$f" "$work/images/c${c}_$(basename "$f")"; done
done
# threshold 0: every one of the 2048 slots is a match, so postprocessing and writing are exercised
# as with trained weights (random weights pass no pair over the default threshold)
cmd=(python3 -m matchrt.cli match-pairs "$work/images" -m eloftr --random-weights -O threshold=0
     --exhaustive --device cuda --batch-size "$batch")
"${cmd[@]}" -o "$work/local" --num-workers 8
"${cmd[@]}" -o "$work/ray1" --ray local --num-workers 1
"${cmd[@]}" -o "$work/ray2" --ray local --num-workers 2
# roma_plus (random weights, 560 coarse / 864 upsampled) on one GPU, a throughput figure only
[ "${ROMA:-1}" = 0 ] || python3 -m matchrt.cli match-pairs "$work/images" -m roma_plus --random-weights --sequential 2 \
    --device cuda --batch-size 2 --num-workers 8 -o "$work/roma_plus"

python3 - "$work" "${OUT:-$work}" <<'EOF'
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
runs = {name: json.loads((work / name / "summary.json").read_text())
        for name in ("local", "ray1", "ray2", "roma_plus") if (work / name / "summary.json").exists()}
keys = ("pairs_matched", "wall_s", "pairs_per_s", "first_batch_s", "pairs_per_s_after_first_batch",
        "model_share", "loader_wait_s", "postprocess_write_s", "ray_read_cpu_s")
for name, s in runs.items():
    print(name, {k: s.get(k) for k in keys})
scaling = {k: runs["ray2"][k] / runs["ray1"][k] for k in ("pairs_per_s", "pairs_per_s_after_first_batch")
           if runs["ray1"].get(k) and runs["ray2"].get(k)}
print("2 GPUs / 1 GPU:", {k: round(v, 3) for k, v in scaling.items()}, "(target >= 1.8)")
out.mkdir(parents=True, exist_ok=True)
(out / "pairs_scaling.json").write_text(json.dumps({"runs": runs, "scaling": scaling}, indent=1))
EOF
