#!/usr/bin/env bash
# The checks to run, in one go, when a session is lent a GPU: on a fresh machine that has only the working
# tree and the CIFAR-10 archive carried in the git-ignored folder .gpu/, in at most 9 minutes.
#
#   mkdir -p .gpu && cp /path/to/cifar-10-python.tar.gz .gpu/   # here: the official archive, or a
#       make_cifar10.py with the cifar10-jpeg.tar.xz it builds cifar-10-batches-py from
#   bash bench/gpu_session.sh [DATA_DIR]      # there: device run with carry [".gpu"]; DATA_DIR: data
#
# Steps, in order of importance, each under its own time limit so that one that hangs does not cost the
# others (LIMITS below: they add up to 540 s, data build included; the sum is printed at the start):
#   data        DATA_DIR/cifar-10-batches-py, built by .gpu/make_cifar10.py (about 15 s) when missing,
#               then read back once through the project's loader
#   device      nvidia-smi (if there is one), python3 __init__.py, the Python, torch, CUDA, cuDNN versions
#   tests       the tests named for CUDA or the GPU (-k "cuda or gpu": those that skip without CUDA and
#               those of the CUDA paths); the whole suite takes far longer than its limit
#   pipeline    bench_pipeline.py for cnn_resnet18,cnn_base: project batches against DataLoader/PIL
#   train       cnn_resnet18 with --compile for EPOCHS (30) epochs: seconds per epoch, test accuracy
#   det-MODEL   --deterministic runs of cnn_base and cnn_resnet18 (issue 18: they crashed on CUDA), each
#               run twice: every metrics.csv column but the wall times must come out identical
#   models      bench_models.py, bf16 and channels_last as train.py runs on CUDA: the throughput of every
#               model, the course's 15 first; rows print as they are measured, the JSON comes at the end
# Steps that need the data are skipped when the data step fails.
#
# Each result is written as soon as it is known. While a step runs, its log is $OUT/<step>.log; when it
# ends, the log moves into $OUT/gpu-session.tar.gz, rebuilt after every step (so a kill mid-way still
# brings back what was done) with session.log (this script's output), steps.csv (each step's limit, exit
# status, wall and CPU seconds), the benchmarks' JSON and the run's files; the JSON and the run's metrics
# and summary are also copied to $OUT. The device tool brings back at most 8 files: here
# gpu-session.tar.gz, session.log, the running step's log, pipeline.json, train-metrics.csv,
# train-summary.json and models.json. Checkpoints stay out (too big). OUT
# defaults to a new temporary folder, printed at the start.
#
# Dry run, to rehearse the plumbing on a CPU in about a minute (tests/test_gpu_session.py does it):
#   DRY_RUN=1 OUT=/tmp/out bash bench/gpu_session.sh DATA_DIR
# runs every step at tiny sizes: one test file, cnn_base for every training step, one step per pipeline
# epoch, 1-epoch runs of 256 images without --compile, the throughput of cnn_base alone, and limits
# four times as long (a CPU shared with other work must not stop it). Each of these can be set alone:
# TESTS (test paths, split on spaces; "skip" skips the step), TESTS_K (the -k expression; empty: every
# test of TESTS), PIPELINE_MODELS, PIPELINE_ARGS, RUN_MODEL, EPOCHS, SUBSET, COMPILE (1 or 0),
# DET_MODELS, DET_EPOCHS, DET_SUBSET, MODELS (comma-separated), MODELS_ARGS, and LIMIT_SCALE, which multiplies
# every limit (each stays at least 5 s).
set -u

declare -A LIMITS=([data]=45 [device]=15 [tests]=90 [pipeline]=75 [train]=190
                   [det-cnn_base]=20 [det-cnn_resnet18]=30 [models]=75)
STEPS=(data device tests pipeline train det-cnn_base det-cnn_resnet18 models)

repo=$(cd "$(dirname "$0")/.." && pwd)
data_dir=$(realpath -m "${1:-${DATA_DIR:-$repo/data}}")
out=$(realpath -m "${OUT:-$(mktemp -d -t gpu-out.XXXXXX)}")
dry_run=${DRY_RUN:-0}
tiny() { if [[ $dry_run == 1 ]]; then echo "$1"; else echo "$2"; fi; }  # tiny DRY_RUN_VALUE REAL_VALUE
limit_scale=${LIMIT_SCALE:-$(tiny 4 1)}
tests=${TESTS:-$(tiny tests/test_batches.py tests)}
tests_k=${TESTS_K-cuda or gpu}
pipeline_models=${PIPELINE_MODELS:-$(tiny cnn_base cnn_resnet18,cnn_base)}
pipeline_args=${PIPELINE_ARGS:-$(tiny "--steps 1 --repeats 1 --batch-size 16 --workers 0" "")}
run_model=${RUN_MODEL:-$(tiny cnn_base cnn_resnet18)}
epochs=${EPOCHS:-$(tiny 1 30)}  # 50 would fit its limit only at 2.6 s an epoch after a minute of compiling
subset=${SUBSET:-$(tiny 256 "")}
compile=${COMPILE:-$(tiny 0 1)}
det_models=${DET_MODELS:-$(tiny cnn_base "cnn_base cnn_resnet18")}
det_epochs=${DET_EPOCHS:-$(tiny 1 2)}
det_subset=${DET_SUBSET:-$(tiny 256 5000)}
models=${MODELS-$(tiny cnn_base "")}  # empty: every model, in --list-models order (the course's 15 first)
models_args=${MODELS_ARGS:-$(tiny "--batch-size 8 --warmup 1 --steps 1" \
                                  "--variants bf16+channels_last --warmup 3 --steps 10")}
for model in $det_models; do
    if [[ ! -v LIMITS[det-$model] ]]; then
        echo "DET_MODELS: $model has no limit here; choose among cnn_base cnn_resnet18" >&2
        exit 2
    fi
done

cd "$repo" || exit 2
mkdir -p "$out" || exit 2
work=$(mktemp -d -t gpu-session.XXXXXX)  # stage/: what the archive holds; runs/: run folders with checkpoints
stage=$work/gpu-session
runs=$work/runs
mkdir -p "$stage" "$runs"
trap 'rm -rf "$work"' EXIT
trap 'exit 143' TERM  # so that a kill (the device tool's at its time limit) cleans up too
exec 3>&1 4>&2 > >(tee -a "$out/session.log") 2>&1
tee_pid=$!
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1  # logs as they happen; no __pycache__ left in the tree

pack() {  # rebuild $out/gpu-session.tar.gz from stage/, through a temporary name so it is never half-written
    cp "$out/session.log" "$stage/" 2>/dev/null
    tar -czf "$out/gpu-session.tar.gz.part" -C "$work" gpu-session &&
        mv -f "$out/gpu-session.tar.gz.part" "$out/gpu-session.tar.gz"
}

scaled_limit() {
    awk -v l="${LIMITS[$1]}" -v s="$limit_scale" 'BEGIN { v = int(l * s + 0.5); print (v < 5 ? 5 : v) }'
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

step() {  # step NAME COMMAND...: run it under its limit into $out/NAME.log, then archive the log, show its end
    local name=$1 limit status seconds user system cpu TIMEFORMAT='%1R %1U %1S'  # `time`: wall, user, system
    limit=$(scaled_limit "$name")
    shift
    echo "=== $name: $* (limit ${limit}s, $(date -u +%T) UTC)"
    { time timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1; } 2> "$work/time"
    status=$?
    read -r seconds user system < "$work/time"
    cpu=$(awk -v u="$user" -v s="$system" 'BEGIN { printf "%.1f", u + s }')
    mv "$out/$name.log" "$stage/$name.log"
    tail -n 25 "$stage/$name.log"
    echo "=== $name: exit $status$( ((status == 124 || status == 137)) && echo ", stopped at its limit")" \
         "after ${seconds}s (${cpu}s of CPU)"
    echo "$name,$limit,$status,$seconds,$cpu" >> "$stage/steps.csv"
    ((status == 0)) || failed+=("$name")
    pack
    return "$status"
}

skip() {  # skip NAME WHY
    echo "=== $1: skipped ($2)"
    [[ $2 == "no data" ]] && failed+=("$1")
    echo "$1,$(scaled_limit "$1"),skipped,0,0" >> "$stage/steps.csv"
    pack
}

keep() {  # keep FILE NAME: a result under stage/ also into $out, by NAME, when there is one
    [[ -f $1 ]] && cp "$1" "$out/$2"
    pack
}

# --- what the steps run, exported: `timeout` runs them through bash -c

data_step() {
    local folder=$data_dir/cifar-10-batches-py file missing=0
    for file in data_batch_1 data_batch_2 data_batch_3 data_batch_4 data_batch_5 test_batch batches.meta; do
        [[ -f $folder/$file ]] || missing=1  # make_cifar10.py writes batches.meta last
    done
    if ((missing)) && [[ -f .gpu/cifar-10-python.tar.gz ]]; then
        echo "copying .gpu/cifar-10-python.tar.gz to $data_dir: the project's loader checks and extracts it"
        mkdir -p "$data_dir" && cp .gpu/cifar-10-python.tar.gz "$data_dir/" || return
        missing=0
    fi
    if ((missing)); then
        if [[ ! -f .gpu/make_cifar10.py || ! -f .gpu/cifar10-jpeg.tar.xz ]]; then
            echo "no $folder, no .gpu/cifar-10-python.tar.gz and no .gpu/make_cifar10.py with"
            echo ".gpu/cifar10-jpeg.tar.xz to build it from; put one of them into .gpu/ and carry .gpu"
            return 2
        fi
        echo "building $folder from .gpu/cifar10-jpeg.tar.xz"
        python3 .gpu/make_cifar10.py "$data_dir" || return
    fi
    python3 - "$data_dir" <<'EOF'
import sys
from load_data_cifar10 import load_cifar10
data = load_cifar10(sys.argv[1], download=False)
for split in ("train", "test"):
    images, labels = getattr(data, f"{split}_images"), getattr(data, f"{split}_labels")
    print(f"{split}: {tuple(images.shape)} {images.dtype}, images per class {labels.bincount().tolist()}")
EOF
}

device_step() {
    nvidia-smi || echo "(no nvidia-smi here)"
    python3 - <<'EOF'
import runpy, sys, torch
runpy.run_path("__init__.py", run_name="__main__")
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version())
EOF
}

tests_step() {
    local args
    read -ra args <<< "$tests"
    python3 -m pytest -v -x --durations=10 -p no:cacheprovider --ignore=tests/test_gpu_session.py \
        ${tests_k:+-k "$tests_k"} "${args[@]}"
}

# A metrics.csv without the columns that a deterministic rerun cannot reproduce: the wall times (*_seconds).
reproducible_columns() {
    awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) keep[i] = ($i !~ /_seconds$/) }
             { row = ""
               for (i = 1; i <= NF; i++) if (keep[i]) row = row (row == "" ? "" : ",") $i
               print row }' "$1"
}

deterministic_step() {  # deterministic_step MODEL: two identical --deterministic runs, the same metrics
    local model=$1 tag
    for tag in det-a det-b; do
        echo "--- $model --deterministic, run $tag"
        python3 main_cifar10.py --model "$model" --deterministic --epochs "$det_epochs" --subset "$det_subset" \
            --data-dir "$data_dir" --results-dir "$runs" --tag "$tag" --no-progress || return
    done
    if diff <(reproducible_columns "$runs/cifar10/$model-det-a/metrics.csv") \
            <(reproducible_columns "$runs/cifar10/$model-det-b/metrics.csv"); then
        echo "--- $model: the two runs' metrics are identical (wall times aside)"
    else
        echo "--- $model: the two runs' metrics differ"
        return 1
    fi
}

export -f data_step device_step tests_step reproducible_columns deterministic_step
export data_dir runs tests tests_k det_epochs det_subset

# --- the session

total=0
for name in "${STEPS[@]}"; do total=$((total + LIMITS[$name])); done
echo "gpu_session: $(date -u '+%F %T') UTC on ${HOSTNAME:-?}; data $data_dir; results $out; dry run: $dry_run"
plan=$(for name in "${STEPS[@]}"; do printf '%s %s s\n' "$name" "${LIMITS[$name]}"; done | paste -sd, -)
echo "step limits add up to $total s: ${plan//,/, }"
[[ $limit_scale == 1 ]] || echo "limits scaled by $limit_scale (each at least 5 s)"
echo "step,limit_s,exit,seconds,cpu_seconds" > "$stage/steps.csv"
session_start=$(now)
failed=()  # the steps that did not end well: the session's exit status is 1 if there is any

have_data=1
step data bash -c data_step || have_data=0
step device bash -c device_step
if [[ $tests == skip ]]; then skip tests "TESTS=skip"; else step tests bash -c tests_step; fi

if ((have_data)); then
    read -ra extra <<< "$pipeline_args"
    step pipeline python3 bench/bench_pipeline.py --data-dir "$data_dir" --models "$pipeline_models" \
        --out "$stage/pipeline.json" "${extra[@]}"
    keep "$stage/pipeline.json" pipeline.json

    tag=e$epochs
    run_flags=(--model "$run_model" --epochs "$epochs" --data-dir "$data_dir" --results-dir "$runs" --no-progress)
    if [[ $compile == 1 ]]; then run_flags+=(--compile); tag+=-compile; fi
    if [[ -n $subset ]]; then run_flags+=(--subset "$subset"); tag+=-subset$subset; fi
    step train python3 main_cifar10.py "${run_flags[@]}" --tag "$tag"
    mkdir -p "$stage/train"
    for file in metrics.csv summary.json log.txt config.json curves.png; do
        [[ -f $runs/cifar10/$run_model-$tag/$file ]] && cp "$runs/cifar10/$run_model-$tag/$file" "$stage/train/"
    done
    keep "$stage/train/summary.json" train-summary.json
    keep "$stage/train/metrics.csv" train-metrics.csv
    [[ -f $stage/train/metrics.csv ]] && awk -F, '  # the first epoch pays for compiling: the others apart
        NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
        { n++; if (n > 1) rest += $col["epoch_seconds"]; first = (n == 1 ? $col["epoch_seconds"] : first)
          acc = $col["val_acc"] }
        END { printf "=== train: %d epochs, the first %.1f s, the others %.2f s on average; last val_acc %.4f\n",
                     n, first, (n > 1 ? rest / (n - 1) : 0), acc }' "$stage/train/metrics.csv"

    for model in $det_models; do
        step "det-$model" bash -c "deterministic_step $model"
        mkdir -p "$stage/det-$model"
        for tag in det-a det-b; do
            [[ -f $runs/cifar10/$model-$tag/metrics.csv ]] &&
                cp "$runs/cifar10/$model-$tag/metrics.csv" "$stage/det-$model/$tag-metrics.csv"
        done
        pack
    done
else
    for name in pipeline train; do skip "$name" "no data"; done
    for model in $det_models; do skip "det-$model" "no data"; done
fi

read -ra extra <<< "$models_args"
step models python3 bench/bench_models.py ${models:+--models "$models"} --out "$stage/models.json" "${extra[@]}"
keep "$stage/models.json" models.json

echo "=== done in $(since "$session_start")s; ${#failed[@]} step(s) failed${failed[*]:+: ${failed[*]}}; steps:"
column -s, -t < "$stage/steps.csv" 2>/dev/null || cat "$stage/steps.csv"
exec >&3 2>&4 3>&- 4>&-  # end tee, so that the last archive holds the whole session.log
wait "$tee_pid" 2>/dev/null
pack
((${#failed[@]} == 0))
