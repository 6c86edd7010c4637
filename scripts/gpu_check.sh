#!/usr/bin/env bash
# Exercise every CUDA path of hydravit in one command (<= 10 min on one H100/H200), on generated data, the steps
# that measure the open questions first:
#   bench_slicing.py, sliced ViT-B against dedicated ViTs, in the two settings of docs/benchmarks.md's GPU table:
#   fp32 (TF32) -b 32 eager with peak memory and batch-1 latency from CUDA graphs, --amp (bf16) -b 256 eager, and
#   both settings compiled (inductor, forward+backward, k = 3 6: k = 12 slices nothing); the CUDA-graph serving path
#   (scripts/check_cuda_graph.py: ElasticRunner on per-k graphs equals the eager forward in fp32 and bf16, batch-1
#   latency eager vs graph, validate_throughput.py --cuda-graph --model-dtype bfloat16); training through
#   distributed_train.sh (nccl DDP when 2+ GPUs are visible) with AMP bf16, AMP fp16 + GradScaler, channels-last,
#   --torchcompile (inductor), sandwich + in-place KD; validate.py on the trained checkpoint; validate_throughput.py
#   (k = 3 6 12, -b 256, fp32 and --amp), validate_memory.py (CUDA peak).
#
#   Time plan on the H200 (seconds; the first run's figures, estimates for the new steps): env + data 15,
#   bench-slicing-fp32 100 (60 of it the memory probes), bench-slicing-amp 35, bench-slicing-compile-fp32 and -amp
#   90 each (about 20 s of inductor per graph, 4 graphs each), cuda-graph 30, training 40 + 29 + 76, validate 16,
#   throughput 21 + 18, memory 14: about 575 s. Steps run in the order below, the open questions first; --budget
#   (or --steps) keeps a run inside a device call's limit.
#
#   scripts/gpu_check.sh [--dry-run] [--out DIR] [--steps NAME,NAME,...] [--budget SECONDS]
#
#   --dry-run   the same plan on the CPU with tiny sizes: the small model in both model slots, a few images,
#               --torchcompile aot_eager (inductor compiles for minutes on a CPU), NPROC 1; the CUDA-graph step and
#               flags are left out (SKIP). Checks the plan, not CUDA.
#   --out DIR   where everything goes (default output/gpu_check/DATE): logs/STEP.log, results/, train/, data/,
#               summary.md (the table printed at the end).
#   --steps     run only these steps (env and data always run), e.g. --steps train-base-fp16-compile,validate.
#               Steps: env data bench-slicing-fp32 bench-slicing-amp bench-slicing-compile-fp32
#               bench-slicing-compile-amp cuda-graph train-small-bf16-compile train-small-fp16 train-base-fp16-compile
#               validate throughput-fp32 throughput-amp memory.
#   --budget S  finish within S seconds: env and data always run; a later step gets at most the time left (cut:
#               FAILED, timed out) and a step that would start with 10 s or less left is SKIPped, so the summary is
#               always written (e.g. --budget 500 inside a 520 s timeout).
#   PYTHON      the interpreter (default python3); it must already have torch, timm and requirements.txt (nothing is
#               installed: the GPU machine may have no internet). NPROC: processes for training (default: the number
#               of visible GPUs).
#
# Every step runs with a time limit; a failing step is reported (status, exit code, the end of its log) and the rest
# still run. The exit status is 1 if any step failed, 0 otherwise; skipped checks are listed as SKIP with the reason.
set -uo pipefail  # no -e: a failed step is recorded, not fatal
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python3}"
DRY=0
OUT=""
STEPS=""
BUDGET=""
while [ "$#" -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) [ "$#" -ge 2 ] || { echo "$0: error: --out needs a folder" >&2; exit 2; }; OUT=$2; shift ;;
        --steps) [ "$#" -ge 2 ] || { echo "$0: error: --steps needs step names" >&2; exit 2; }; STEPS=$2; shift ;;
        --budget)
            [[ "$#" -ge 2 && "$2" =~ ^[1-9][0-9]*$ ]] || {
                echo "$0: error: --budget needs a whole number of seconds > 0" >&2; exit 2; }
            BUDGET=$2; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "$0: error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
ALL_STEPS="env data bench-slicing-fp32 bench-slicing-amp bench-slicing-compile-fp32 bench-slicing-compile-amp
cuda-graph train-small-bf16-compile train-small-fp16 train-base-fp16-compile validate throughput-fp32 throughput-amp
memory"
for s in ${STEPS//,/ }; do
    if ! [[ " ${ALL_STEPS//$'\n'/ } " == *" $s "* ]]; then
        echo "$0: error: --steps: unknown step '$s' (steps: $(echo $ALL_STEPS))" >&2
        exit 2
    fi
done
OUT="${OUT:-output/gpu_check/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT/logs" "$OUT/results" || exit 2
START=$SECONDS

# --- the plan's sizes: GPU, or tiny on the CPU -----------------------------------------------------------------
if [ "$DRY" = 1 ]; then
    DEVICE=(--device cpu)
    SMALL=hydravit_dyn_patch4_32
    BASE=hydravit_dyn_patch4_32  # ViT-B's checkpoints are 1.4 GB: the dry run only checks the plan
    BASE_SIZE=32
    SMALL_IMAGES=4; BASE_IMAGES=2; VAL_IMAGES=1; BATCH=4; BASE_BATCH=4; EVAL_BATCH=4; WORKERS=0  # per class
    COMPILE=(--torchcompile aot_eager)
    NPROC="${NPROC:-1}"
    THROUGHPUT=(--num-warm-iter 1 --num-bench-iter 2)
    BENCH=(--device cpu --ks 3 --reps 1 --train-reps 1 --warmup 1 --min-time 0 --threads 1)
    BENCH_GRAPH=()  # CUDA graphs need a GPU
    BENCH_COMPILE=(--compile aot_eager --ks 3)
    LIMIT_TRAIN=300; LIMIT_EVAL=300
else
    DEVICE=()
    SMALL=hydravit_dyn_patch4_32
    BASE=hydravit_dyn_patch16_224
    BASE_SIZE=224
    SMALL_IMAGES=128; BASE_IMAGES=64; VAL_IMAGES=16; BATCH=64; BASE_BATCH=32; EVAL_BATCH=256; WORKERS=4
    COMPILE=(--torchcompile)  # inductor
    NPROC="${NPROC:-$("$PY" -c 'import torch; print(max(torch.cuda.device_count(), 1))' 2>/dev/null || echo 1)}"
    THROUGHPUT=()
    BENCH=(--device cuda --reps 3 --train-reps 3 --warmup 2 --min-time 0.2)
    BENCH_GRAPH=(--cuda-graph)
    BENCH_COMPILE=(--compile --ks 3 6)  # inductor; k = 12 slices nothing: the same graph as the dedicated ViT's
    LIMIT_TRAIN=420; LIMIT_EVAL=240
fi
HEADS=(--heads 3 6 12)
TRAIN_COMMON=(--epochs 1 --opt adamw --lr 5e-4 --weight-decay 0.05 --sched cosine --warmup-epochs 0
    --smoothing 0.1 --workers "$WORKERS" --log-interval 4 --seed 0 --num-classes 4 --model-ema
    --model-ema-decay 0.99 --output "$OUT/train" "${DEVICE[@]}")
SANDWICH=(--subnets-per-step 3 --subnet-policy sandwich --inplace-kd)

# --- running and recording steps -------------------------------------------------------------------------------
NAMES=(); STATUS=(); SECS=(); NOTES=()
record() { NAMES+=("$1"); STATUS+=("$2"); SECS+=("$3"); NOTES+=("$4"); }
stamp() { printf '[%3dm%02ds]' $(((SECONDS - START) / 60)) $(((SECONDS - START) % 60)); }
selected() { [ -z "$STEPS" ] || [ "$1" = env ] || [ "$1" = data ] || [[ ",$STEPS," == *",$1,"* ]]; }

# run_step NAME LIMIT_S NOTE_PATTERN CMD...: CMD goes to logs/NAME.cmd, its output to logs/NAME.log; every 30 s the
# log's last line is shown; NOTE_PATTERN (grep -E) picks the log line that goes into the summary table.
run_step() {
    local name=$1 limit=$2 pattern=$3
    shift 3
    selected "$name" || return 0
    if [ -n "$BUDGET" ] && [ "$name" != env ] && [ "$name" != data ]; then
        local left=$((BUDGET - (SECONDS - START)))
        if [ "$left" -le 10 ]; then
            skip_step "$name" "--budget $BUDGET s: $((left > 0 ? left : 0)) s left"
            return 0
        fi
        [ "$left" -lt "$limit" ] && limit=$left
    fi
    local log="$OUT/logs/$name.log" begin=$SECONDS rc note next=$((SECONDS + 30))
    echo "$(stamp) $name: started (up to ${limit} s; log $log)"
    printf '%q ' "$@" > "$OUT/logs/$name.cmd"
    echo >> "$OUT/logs/$name.cmd"
    timeout --kill-after=15 "$limit" "$@" > "$log" 2>&1 &
    local pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        if [ "$SECONDS" -ge "$next" ] && kill -0 "$pid" 2>/dev/null; then
            echo "$(stamp)   $name, $((SECONDS - begin)) s: $(tail -n 1 "$log" | cut -c1-110)"
            next=$((next + 30))
        fi
    done
    wait "$pid"
    rc=$?
    note=$(grep -E -- "$pattern" "$log" 2>/dev/null | tail -n 1 | sed -E 's/^.*(INFO|WARNING): ?//' | cut -c1-100)
    if [ "$rc" -eq 0 ]; then
        record "$name" ok $((SECONDS - begin)) "$note"
        echo "$(stamp) $name: ok in $((SECONDS - begin)) s"
    else
        local why="exit $rc"
        [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && why="timed out after ${limit} s"
        note=$(grep -E 'error|Error' "$log" | tail -n 1)
        note=${note:-$(tail -n 1 "$log")}
        record "$name" "FAILED ($why)" $((SECONDS - begin)) "$(echo "${note:-(no output)}" | cut -c1-100)"
        echo "$(stamp) $name: FAILED ($why); end of $log:" >&2
        tail -n 15 "$log" | sed 's/^/    /' >&2
    fi
}

skip_step() { record "$1" SKIP 0 "$2"; echo "$(stamp) $1: SKIP ($2)"; }

# The table of every step (also in summary.md); returns 1 if any step failed.
summary() {
    local failed=0 i
    {
        echo "| step | status | seconds | detail (log: $OUT/logs/STEP.log) |"
        echo "|---|---|---:|---|"
        for i in "${!NAMES[@]}"; do
            echo "| ${NAMES[$i]} | ${STATUS[$i]} | ${SECS[$i]} | ${NOTES[$i]//|//} |"
            [[ "${STATUS[$i]}" == FAILED* ]] && failed=$((failed + 1))
        done
    } > "$OUT/summary.md"
    echo
    cat "$OUT/summary.md"
    echo
    echo "$(stamp) $((${#NAMES[@]} - failed)) of ${#NAMES[@]} steps ok or skipped, $failed failed; everything is in $OUT"
    [ "$failed" -eq 0 ]
}

# --- the plan ----------------------------------------------------------------------------------------------------
echo "$(stamp) hydravit GPU check$([ "$DRY" = 1 ] && echo ' (dry run on the CPU, tiny sizes)') -> $OUT"
run_step env 120 'torch .* timm' "$PY" -c "
import sys, torch, timm, yaml, safetensors, torchinfo  # what the steps import
import hydravit
print(f'python {sys.version.split()[0]}, torch {torch.__version__}, timm {timm.__version__}, '
      f'CUDA {torch.version.cuda}, GPUs {torch.cuda.device_count()}')
for i in range(torch.cuda.device_count()):
    print(f'GPU {i}: {torch.cuda.get_device_name(i)}')
if $DRY == 0 and not torch.cuda.is_available():
    sys.exit('error: CUDA is not available (use --dry-run to check the plan on the CPU)')
if $DRY == 0:
    import torch.distributed as dist
    print('nccl available:', dist.is_nccl_available())
"
if [ "${STATUS[0]}" != ok ]; then
    echo "$(stamp) the environment is not usable; nothing else is run" >&2
    summary
    exit 1
fi

run_step data 120 'images' "$PY" -c "
from pathlib import Path
import numpy as np
from PIL import Image
def folder(root, size, train, val, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    for split, count in (('train', train), ('validation', val)):
        for c in range(classes):
            path = Path(root) / split / f'class{c}'
            path.mkdir(parents=True, exist_ok=True)
            for i in range(count):  # each class its own mean colour: learnable in one epoch
                pixels = rng.integers(0, 64, (size, size, 3)) + 48 * c
                Image.fromarray(pixels.astype(np.uint8)).save(path / f'{i}.png')
    print(f'{root}: {classes} classes x ({train} train + {val} validation) images of {size} px')
folder('$OUT/data/small', 32, $SMALL_IMAGES, $VAL_IMAGES)  # on the GPU 8 steps of -b 64
folder('$OUT/data/base', $BASE_SIZE, $BASE_IMAGES, $VAL_IMAGES)  # on the GPU 8 steps of -b 32
"

# --- sliced against dedicated (the open questions first) -------------------------------------------------------
BENCH_NOTE='^\| (3|12) \| (forward\+backward|latency, batch 1, CUDA)'
run_step bench-slicing-fp32 "$LIMIT_EVAL" "$BENCH_NOTE" "$PY" scripts/bench_slicing.py --model "$BASE" "${BENCH[@]}" \
    -b 32 "${BENCH_GRAPH[@]}" --markdown --output-json "$OUT/results/bench_slicing_fp32.json"
run_step bench-slicing-amp "$LIMIT_EVAL" "$BENCH_NOTE" "$PY" scripts/bench_slicing.py --model "$BASE" "${BENCH[@]}" \
    --amp --amp-dtype bfloat16 -b "$((DRY ? 4 : 256))" --no-memory --markdown \
    --output-json "$OUT/results/bench_slicing_amp.json"
for setting in fp32 amp; do
    [ "$setting" = amp ] && PRECISION=(--amp --amp-dtype bfloat16 -b "$((DRY ? 4 : 256))") || PRECISION=(-b 32)
    run_step "bench-slicing-compile-$setting" "$LIMIT_EVAL" '^\| [0-9]+ \| forward\+backward' "$PY" \
        scripts/bench_slicing.py --model "$BASE" "${BENCH[@]}" "${BENCH_COMPILE[@]}" "${PRECISION[@]}" --metrics train \
        --no-memory --markdown --output-json "$OUT/results/bench_slicing_compile_$setting.json"
done
if [ "$DRY" = 1 ]; then
    selected cuda-graph && skip_step cuda-graph "dry run: CUDA graphs need a GPU (their dispatch is tested on the CPU)"
else
    run_step cuda-graph "$LIMIT_EVAL" '^CUDA graphs:' "$PY" scripts/check_cuda_graph.py --model "$BASE" "${HEADS[@]}"
fi

# --- training, evaluation ----------------------------------------------------------------------------------------
if [ "$NPROC" = 1 ] && { selected train-small-bf16-compile || selected train-small-fp16 ||
        selected train-base-fp16-compile; }; then
    skip_step nccl-ddp "1 training process (NPROC=1, $([ "$DRY" = 1 ] && echo 'dry run' || echo '1 GPU')): DDP over nccl needs 2 GPUs"
fi
TRAIN_NOTE='first step at k=|Epoch 0 done'
run_step train-small-bf16-compile "$LIMIT_TRAIN" "$TRAIN_NOTE" ./distributed_train.sh "$NPROC" "$OUT/data/small" \
    --model "$SMALL" "${TRAIN_COMMON[@]}" "${HEADS[@]}" "${SANDWICH[@]}" -b "$BATCH" \
    --amp --amp-dtype bfloat16 --channels-last "${COMPILE[@]}" --experiment small-bf16-compile
run_step train-small-fp16 "$LIMIT_TRAIN" "$TRAIN_NOTE" ./distributed_train.sh "$NPROC" "$OUT/data/small" \
    --model "$SMALL" "${TRAIN_COMMON[@]}" "${HEADS[@]}" "${SANDWICH[@]}" -b "$((BATCH / 2))" --grad-accum-steps 2 \
    --amp --amp-dtype float16 --channels-last --experiment small-fp16
# ViT-B compiles about a minute per head count: two graphs here (sandwich of 2: k = 12 and 3, in-place KD)
run_step train-base-fp16-compile "$LIMIT_TRAIN" "$TRAIN_NOTE" ./distributed_train.sh "$NPROC" "$OUT/data/base" \
    --model "$BASE" "${TRAIN_COMMON[@]}" --heads 3 12 --subnets-per-step 2 --subnet-policy sandwich --inplace-kd \
    -b "$BASE_BATCH" --amp --amp-dtype float16 --channels-last "${COMPILE[@]}" --experiment base-fp16-compile
run_step validate "$LIMIT_EVAL" '"top1"' "$PY" validate.py "$OUT/data/base" --model "$BASE" "${DEVICE[@]}" \
    --checkpoint "$OUT/train/base-fp16-compile/last.pth.tar" --use-ema "${HEADS[@]}" -b 64 --amp --amp-dtype bfloat16 --workers 2 \
    --results-file "$OUT/results/validate.csv"
run_step throughput-fp32 "$LIMIT_EVAL" '"throughput"' "$PY" validate_throughput.py --model "$BASE" "${DEVICE[@]}" \
    "${HEADS[@]}" -b "$EVAL_BATCH" "${THROUGHPUT[@]}" --results-file "$OUT/results/throughput_fp32.csv"
run_step throughput-amp "$LIMIT_EVAL" '"throughput"' "$PY" validate_throughput.py --model "$BASE" "${DEVICE[@]}" \
    "${HEADS[@]}" -b "$EVAL_BATCH" "${THROUGHPUT[@]}" --amp --amp-dtype bfloat16 \
    --results-file "$OUT/results/throughput_amp.csv"
run_step memory "$LIMIT_EVAL" '"peak' "$PY" validate_memory.py --model "$BASE" "${DEVICE[@]}" "${HEADS[@]}" \
    --results-file "$OUT/results/memory.csv"

summary
