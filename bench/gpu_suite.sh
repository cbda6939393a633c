#!/usr/bin/env bash
# The GPU benchmarks in one go (issue 18.4), on one CUDA machine in under 8 minutes, each step with a timeout:
#
#   P1  bench/pretrain_throughput.py  L4H64A4 and L4H256A4, cuda, bf16: events/s, MFU against the bf16 matmul peak
#                                     measured in the same run, peak CUDA memory
#   P3  bench/ctr_throughput.py       DCN-v2 and TIN, cuda, bf16: train / inference samples/s, MFU, peak CUDA memory
#   P4  bench/pretrain_sharded.py     `hybrid pretrain` with 1 and 2 processes (torchrun, nccl), cuda, bf16; the
#                                     1-process run with its tables in a 1-rank DMP (FBGEMM's CUDA kernels). With one
#                                     GPU both ranks go on it (--one-gpu); if nccl refuses two ranks on one device the
#                                     report says so (processes_share_one_gpu_over_nccl, note) and keeps the 1-process run.
#
# Prepares ml-1m-partial protocols A (last-item, for P1/P4) and B (ratings, for P3) first when runs/ml1m/... is missing
# (`hybrid data prepare --config configs/prepare_ml1m_{last_item,ratings}.yaml`, raw data in ../shared/data/ml-1m-partial
# or $ML1M_RAW). Writes one JSON per step and suite.json (steps, status, seconds, the GPU, the MFU figures) to OUT_DIR.
#
#   bash bench/gpu_suite.sh [OUT_DIR]              default OUT_DIR: bench/results/gpu
#   bash bench/gpu_suite.sh --dry-run [OUT_DIR]    print the steps and their commands, run nothing (no GPU needed)
#
# Environment: PYTHON (default .venv/bin/python, else python3), THREADS (host threads, default min(nproc, 8)),
# ML1M_RAW (raw ml-1m-partial directory), BUDGET_S (seconds for the whole suite, default 470).
# Exit status: 0 all steps ran, 1 a step failed or timed out (see OUT_DIR/logs/), 2 no GPU / no data (nothing run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
OUT="${1:-bench/results/gpu}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
THREADS="${THREADS:-$(( $(nproc) < 8 ? $(nproc) : 8 ))}"
BUDGET_S="${BUDGET_S:-470}"          # 8 minutes less a margin: no step starts that cannot end inside it
RAW="${ML1M_RAW:-../shared/data/ml-1m-partial}"
DATA_A=runs/ml1m/last-item
DATA_B=runs/ml1m/ratings

die() { echo "gpu_suite: $*" >&2; exit 2; }

# ------------------------------------------------------------------------------------------- a GPU, seen by torch
GPUS=1
if (( ! DRY )); then
    command -v nvidia-smi >/dev/null 2>&1 || die "no nvidia-smi here: this suite needs a CUDA GPU machine (nothing was run)"
    nvidia-smi -L >/dev/null 2>&1 || die "nvidia-smi finds no GPU (driver not loaded?): nothing was run"
    "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null \
        || die "$PYTHON: torch $("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo '?') sees no CUDA device (a CPU build of torch, or fbgemm-gpu-cpu instead of fbgemm-gpu?): nothing was run"
    GPUS=$(nvidia-smi -L | grep -c '^GPU' || true)
fi

mkdir -p "$OUT/logs"
STEPS_TSV="$OUT/logs/steps.tsv"
: > "$STEPS_TSV"
FAILED=0

# step NAME PLANNED_TIMEOUT_S OUTPUT_JSON CMD...: runs CMD under `timeout`, within what is left of BUDGET_S
step() {
    local name=$1 planned=$2 output=$3; shift 3
    local left=$(( BUDGET_S - SECONDS ))
    local limit=$(( planned < left ? planned : left ))
    if (( DRY )); then
        printf '[%s] timeout %ss: %s\n' "$name" "$planned" "$*"
        return 0
    fi
    if (( limit < 30 )); then
        echo "[$name] skipped: ${left}s left of the ${BUDGET_S}s budget"
        printf '%s\tskipped\t0\t%s\t%s\n' "$name" "$output" "$planned" >> "$STEPS_TSV"
        FAILED=1
        return 0
    fi
    echo "[$name] (timeout ${limit}s) $*"
    local started=$SECONDS rc=0
    timeout --kill-after=10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1 || rc=$?
    local status=ok
    if (( rc == 124 || rc == 137 )); then status="timed out after ${limit}s"; elif (( rc != 0 )); then status="failed (exit $rc)"; fi
    [[ $status == ok ]] || FAILED=1
    echo "[$name] $status in $(( SECONDS - started ))s (log: $OUT/logs/$name.log)"
    tail -n 12 "$OUT/logs/$name.log" | sed "s/^/    /"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$(( SECONDS - started ))" "$output" "$limit" >> "$STEPS_TSV"
}

# ------------------------------------------------------------------------------------------- data (when missing)
prepare() {  # prepare NAME CONFIG OUT_DIR
    if [[ -f "$3/stats.json" && -f "$3/feature_map.json" ]]; then
        echo "[$1] $3 is there"
        return 0
    fi
    if (( ! DRY )) && [[ ! -d "$RAW" ]]; then
        die "$3 is missing and so is the raw ml-1m-partial ($RAW): copy one of them here (or set ML1M_RAW)"
    fi
    step "$1" 60 "$3" "$PYTHON" -m hybrid data prepare --config "$2" --set "data.path=$RAW" --set "out=$3" \
        --set tracking.enabled=false --quiet
}
prepare prepare_a configs/prepare_ml1m_last_item.yaml "$DATA_A"
prepare prepare_b configs/prepare_ml1m_ratings.yaml "$DATA_B"

# ------------------------------------------------------------------------------------------- the benchmarks
# Windows of 10-20 steps: a GPU step takes milliseconds, so the CPU defaults (3-5 steps) would time launch noise.
step p1_pretrain_throughput 150 "$OUT/p1_pretrain_throughput.json" \
    "$PYTHON" bench/pretrain_throughput.py --data "$DATA_A" --device cuda --precision bf16 --threads "$THREADS" \
    --sizes L4H64A4 L4H256A4 --warmup 3 --steps 10 --repeats 5 --out "$OUT/p1_pretrain_throughput.json"

step p3_ctr_throughput 120 "$OUT/p3_ctr_throughput.json" \
    "$PYTHON" bench/ctr_throughput.py --data "$DATA_B" --device cuda --precision bf16 --threads "$THREADS" \
    --warmup 3 --steps 20 --repeats 5 --out "$OUT/p3_ctr_throughput.json"

# each of its two runs gets half of what the step may take (less the report), so the report is always written
P4_LIMIT=$(( BUDGET_S - SECONDS < 180 ? BUDGET_S - SECONDS : 180 ))
P4_ARGS=(--data "$DATA_A" --device cuda --precision bf16 --epochs 2 --threads "$THREADS" --shard-tables --keep-going
         --run-timeout $(( P4_LIMIT > 60 ? (P4_LIMIT - 20) / 2 : 20 )) --out "$OUT/p4_pretrain_sharded.json")
if (( GPUS < 2 )); then P4_ARGS+=(--one-gpu); fi   # one GPU: both ranks on it (nccl may refuse: the report says)
step p4_pretrain_sharded 180 "$OUT/p4_pretrain_sharded.json" "$PYTHON" bench/pretrain_sharded.py "${P4_ARGS[@]}"

if (( DRY )); then exit 0; fi

# ------------------------------------------------------------------------------------------- suite.json
GPU_INFO=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1 || true)
"$PYTHON" - "$OUT" "$STEPS_TSV" "$GPU_INFO" "$GPUS" "$BUDGET_S" "$SECONDS" <<'EOF'
import json, subprocess, sys, time
from pathlib import Path

out, tsv, gpu, gpus, budget, seconds = sys.argv[1:7]
steps = []
for line in Path(tsv).read_text().splitlines():
    name, status, took, output, limit = line.split("\t")
    steps.append({"step": name, "status": status, "seconds": int(took), "timeout_s": int(limit), "output": output})
summary = {"suite": "bench/gpu_suite.sh", "date": time.strftime("%Y-%m-%d %H:%M"), "gpu": gpu, "gpus": int(gpus),
           "budget_s": int(budget), "seconds": int(seconds), "steps": steps}
try:
    summary["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    pass
p1 = Path(out) / "p1_pretrain_throughput.json"
if p1.exists():
    report = json.loads(p1.read_text())
    summary["bf16_matmul_peak_tflops"] = report.get("bf16_matmul_peak_gflops", float("nan")) / 1e3
    summary["p1_mfu_bf16"] = {f"{row['size']} {variant}": row[variant].get("mfu_bf16")
                              for row in report["results"] for variant in ("ours", "baseline")}
    summary["p1_events_per_s"] = {f"{row['size']} {variant}": row[variant]["events_per_s"]
                                  for row in report["results"] for variant in ("ours", "baseline")}
p3 = Path(out) / "p3_ctr_throughput.json"
if p3.exists():
    report = json.loads(p3.read_text())
    summary["p3_train_mfu_bf16"] = {f"{row['model']} {variant}": row[variant].get("train_mfu_bf16")
                                    for row in report["results"] for variant in ("ours", "baseline")}
p4 = Path(out) / "p4_pretrain_sharded.json"
if p4.exists():
    report = json.loads(p4.read_text())
    summary["p4"] = {k: report.get(k) for k in ("time_per_step_ratio_2_over_1", "processes_share_one_gpu_over_nccl", "note")}
Path(out, "suite.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
EOF
echo "gpu_suite: ${SECONDS}s; reports in $OUT/"
exit "$FAILED"
