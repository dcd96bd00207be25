#!/usr/bin/env bash
# The checks to run when a session is lent a GPU, as two calls of the device tool on one warm machine: on a fresh
# machine that has only the working tree and the CIFAR-10 archive carried in the git-ignored folder .gpu/.
#
#   mkdir -p .gpu && cp /path/to/cifar-10-python.tar.gz .gpu/  # here, once: the official archive (or a
#       make_cifar10.py with the JPEG archive it builds cifar-10-batches-py from, as this workplace has)
#   PART=speed bash bench/gpu_session.sh data                 # there: call 1, carry [".gpu"], timeout_s 330
#   PART=accuracy COMPILE=0|1 bash bench/gpu_session.sh data  # there: call 2 at once, timeout_s 440 (idle 30 s: gone)
#   PLAN_ONLY=1 PART=... bash bench/gpu_session.sh            # anywhere: the limits, the worst case, the decision
#
# The budget. A session has 15 minutes of device time: a machine start (1-2 min), then the two calls back to back
# (the machine goes back after 30 s idle). So each part's worst case must stay well inside the tool's 600 s per
# command, and the two together under 12 minutes (720 s). The worst case of a part is the sum, over its steps, of
# the step's limit + KILL_GRACE (a step still running at its limit gets SIGTERM, then SIGKILL KILL_GRACE s later:
# `timeout -k`) + STEP_OVERHEAD (copying its results and rebuilding the archive: measured well under 1 s).
#   speed     6 steps: 265 s of limits + 6 x (5 + 1) s = 301 s
#   accuracy  3 steps: 390 s of limits + 3 x (5 + 1) s = 408 s      together 709 s < 720 s
# The script prints this arithmetic from LIMITS below at the start (tests/test_gpu_session.py checks it) and
# refuses to run when a part's worst case is over CALL_BUDGET or both parts' over SESSION_BUDGET.
#
# Part speed, in order of importance; each limit from the arithmetic beside it (H100 figures are docs/gpu.md's targets
# and guesses: nothing has run on a GPU yet; a first epoch pays for cuDNN autotuning and for compiling):
#   data           25 s  DATA_DIR/cifar-10-batches-py, built by .gpu/make_cifar10.py when missing (15 s on 2 busy
#                        cores here; the box has 16), then read back once through the project's loader (3 s)
#   device         25 s  nvidia-smi, python3 __init__.py, versions (5 s); the compile pre-flight: a C compiler
#                        (CC, else gcc or clang, as Triton looks) and Python.h, which Triton needs, then
#                        torch.compile of a tiny function on the device (cold: about 10-15 s)
#   checks         50 s  side by side: the tests named for CUDA or the GPU (-k "cuda or gpu", 24 tests: 66 s on 2
#                        busy cores here, the compile ones the slowest) and, for cnn_base and cnn_resnet18, two
#                        --deterministic runs of 2 epochs on 5,000 images whose metrics.csv must agree but for
#                        the wall times (issue 18: they crashed on CUDA): 2 x (6 s start + 4 s) each
#   pipeline       40 s  bench_pipeline.py, cnn_resnet18 whole epochs, --repeats 2: 6 s start, a warm-up round
#                        (4 s), 2 x (project ~2 s + DataLoader/PIL with 2 workers 6-10 s) = 26-34 s
#   train-compile  75 s  cnn_resnet18 --compile, 3 epochs: 8 s start, epoch 1 compiles 4 graphs (training and
#                        evaluation, full and last batch: 40-60 s cold), 2 x ~2 s, the final tests 2 s = 55-75 s
#   models         50 s  bench_models.py, bf16+channels_last, batch 256, --warmup 2 --steps 5, the course's 15
#                        models first (--list-models order): 5 s start, then 1-3 s a model, 5-12 s for a
#                        DenseNet (cuDNN autotunes each new conv shape: DenseNet-264 has ~130): about the course's
#                        models, the rest as far as the limit goes (each row is saved as it is measured)
# Part accuracy:
#   data, device   25 s each, as above (the data are there on a warm machine; the tiny compile only if compiling)
#   accuracy      340 s  cnn_resnet18 and cnn_se_resnet18, 50 epochs of the default recipe each, side by side on
#                        the one GPU (the course report's headline pair: 85.29% vs 77.19% under its own recipe).
#                        At docs/gpu.md's H100 target, 1.5-2.6 s a ResNet-18 epoch (SE ~20% more: 1.8-3.1 s), one
#                        after the other would need 2 x 15 s (start, autotuning, final tests) + 50 x (2.6 + 3.1) s
#                        = 315 s; side by side, each run takes the whole limit if it needs it, and the GPU, mostly
#                        waiting on kernel launches at batch 128, serves both at once: at most the sum, when the
#                        GPU is the bottleneck, less when launches are. Fewer epochs are not an option (issue 33).
#
# Eager or compiled for the accuracy runs (COMPILE=0/1 decides; unset, the speed part's figures do): compiled when
#   first_compiled + (E-1) x steady_compiled < E x eager          (E = 50 epochs, training seconds only)
# with first/steady_compiled the train_seconds of train-compile's first epoch and the median of the others, and
# eager a whole epoch of the pipeline step's project rows for the same model (train.py's step, its batches). The
# speed part writes them to speed.csv, in $OUT and at SPEED_FIGURES (default DATA_DIR/gpu-session-speed.csv: the
# data folder stays on a warm machine between calls; .gpu/ does not, carry replaces it), and ends with the
# decision and the command for call 2. The coordinator passes COMPILE from that line (safe on a fresh machine
# too); without COMPILE the accuracy part applies the rule to SPEED_FIGURES, and trains eager without them. A
# compile the device step found unavailable is never used: steps that would compile skip it and say why.
#
# Each result is written as soon as it is known. While a step runs, its log is $OUT/<step>.log; when it ends,
# the log moves into $OUT/gpu-session.tar.gz, rebuilt after every step with session.log (this script's output),
# steps.csv (each step's limit, exit status, wall and CPU seconds) and every step's results. The benchmarks write
# their JSON into $OUT themselves, rewritten after every model or round ("complete": false until the end), so
# even a step killed mid-way, or the whole call, brings back what was measured. The device tool brings back at
# most 8 files: here the archive, session.log, the running step's log, and pipeline.json, models.json, speed.csv
# (part speed) or accuracy.csv (part accuracy). Checkpoints stay out (too big). OUT defaults to a new
# temporary folder, printed at the start.
#
# Dry run, to rehearse the plumbing on a CPU (tests/test_gpu_session.py does it): DRY_RUN=1 runs every step at
# tiny sizes: one test file, cnn_base for the speed steps, 1-2 epochs on 256 (32) images, no compiling (COMPILE=0
# unless given), the throughput of cnn_base alone, and limits four times as long (a CPU shared with other work
# must not stop it). Each of these can be set alone: TESTS (test paths, split on spaces; "skip" skips them),
# TESTS_K (the -k expression; empty: every test of TESTS), DET_MODELS, DET_EPOCHS, DET_SUBSET, PIPELINE_MODELS,
# PIPELINE_ARGS, RUN_MODEL (the compiled run and the model the rule compares), RUN_EPOCHS, SUBSET, COMPILE,
# MODELS (comma-separated), MODELS_ARGS, ACC_MODELS (space-separated), ACC_EPOCHS, ACC_SUBSET, SPEED_FIGURES;
# LIMIT_SCALE multiplies every limit (each stays at least 5 s); ONLY (step names, comma- or space-separated) runs
# just those steps of the part, the others skipped; PLAN_ONLY=1 prints the plan and the decision, and stops.
set -u

declare -A LIMITS=([data]=25 [device]=25 [checks]=50 [pipeline]=40 [train-compile]=75 [models]=50
                   [accuracy]=340)
declare -A PART_STEPS=([speed]="data device checks pipeline train-compile models" [accuracy]="data device accuracy")
KILL_GRACE=5     # seconds from a step's SIGTERM at its limit to the SIGKILL (`timeout -k`)
STEP_OVERHEAD=1  # seconds a step's bookkeeping may take after it ends: copies, the archive
CALL_BUDGET=540  # seconds one part may take in the worst case: the device tool allows 600 s a command
SESSION_BUDGET=720  # seconds both parts may take: 15 minutes of device time less a machine start (3 min)
DET_CHOICES="cnn_base cnn_resnet18"  # the models whose deterministic runs the checks' limit was sized for

fail() { echo "$*" >&2; exit 2; }
part=${PART:-speed}
[[ -v PART_STEPS[$part] ]] || fail "PART=$part: choose speed (call 1) or accuracy (call 2)"
read -ra steps <<< "${PART_STEPS[$part]}"

repo=$(cd "$(dirname "$0")/.." && pwd)
data_dir=$(realpath -m "${1:-${DATA_DIR:-$repo/data}}")
data_arg=${1:-${DATA_DIR:-data}}  # as given, for the command line printed for call 2
dry_run=${DRY_RUN:-0}
plan_only=${PLAN_ONLY:-0}
tiny() { if [[ $dry_run == 1 ]]; then echo "$1"; else echo "$2"; fi; }  # tiny DRY_RUN_VALUE REAL_VALUE
limit_scale=${LIMIT_SCALE:-$(tiny 4 1)}
tests=${TESTS:-$(tiny tests/test_batches.py tests)}
tests_k=${TESTS_K-cuda or gpu}
det_models=${DET_MODELS-$(tiny cnn_base "cnn_base cnn_resnet18")}
det_epochs=${DET_EPOCHS:-$(tiny 1 2)}
det_subset=${DET_SUBSET:-$(tiny 256 5000)}
run_model=${RUN_MODEL:-$(tiny cnn_base cnn_resnet18)}
pipeline_models=${PIPELINE_MODELS:-$run_model}  # the rule's eager figure comes from here
pipeline_args=${PIPELINE_ARGS:-$(tiny "--steps 1 --repeats 1 --batch-size 16 --workers 0" "--repeats 2")}
run_epochs=${RUN_EPOCHS:-$(tiny 2 3)}
subset=${SUBSET:-$(tiny 256 "")}
models=${MODELS-$(tiny cnn_base "")}  # empty: every model, in --list-models order (the course's 15 first)
models_args=${MODELS_ARGS:-$(tiny "--batch-size 8 --warmup 1 --steps 1" \
                                  "--variants bf16+channels_last --warmup 2 --steps 5")}
acc_models=${ACC_MODELS:-cnn_resnet18 cnn_se_resnet18}
acc_epochs=${ACC_EPOCHS:-$(tiny 1 50)}
acc_subset=${ACC_SUBSET:-$(tiny 32 "")}
speed_figures=$(realpath -m "${SPEED_FIGURES:-$data_dir/gpu-session-speed.csv}")
compile_asked=${COMPILE-}
[[ $compile_asked =~ ^[01]?$ ]] || fail "COMPILE=$compile_asked: use 1 (compile), 0 (eager) or leave it unset"

only=${ONLY:-}
for name in ${only//,/ }; do
    [[ " ${steps[*]} " == *" $name "* ]] || fail "ONLY: part $part has no step $name; its steps: ${steps[*]}"
done
for model in $det_models; do
    [[ " $DET_CHOICES " == *" $model "* ]] ||
        fail "DET_MODELS: $model has no time in the plan; choose among $DET_CHOICES"
done
[[ $(tr ' ' '\n' <<< "$acc_models" | sort | uniq -d) == "" ]] || fail "ACC_MODELS: a model named twice: $acc_models"

# --- the plan: limits, worst case, the compile decision

worst() {  # worst PART: the part's worst case in seconds
    local name total=0
    for name in ${PART_STEPS[$1]}; do total=$((total + LIMITS[$name] + KILL_GRACE + STEP_OVERHEAD)); done
    echo "$total"
}
worst_case=$(worst "$part")
both_parts=$(($(worst speed) + $(worst accuracy)))

# The rule above, over speed.csv (mode,first_epoch_train_seconds,steady_epoch_train_seconds): prints
# "1 WHY" or "0 WHY"; 0 also when a figure is missing.
decide_compile() {  # decide_compile FIGURES EPOCHS
    awk -F, -v epochs="$2" -v file="$1" '
        NR > 1 && $2 != "" && $3 != "" { total[$1] = $2 + (epochs - 1) * $3 }
        END {
            if (!("eager" in total) || !("compile" in total)) {
                printf "0 %s has no %s figure: eager\n", file, ("eager" in total) ? "compiled" : "eager"; exit }
            faster = total["compile"] < total["eager"]
            printf "%d %s: %d epochs of training take %.0f s compiled, %.0f s eager (%s)\n", faster,
                   faster ? "compiled" : "eager", epochs, total["compile"], total["eager"], file }' "$1"
}

if [[ $part == accuracy ]]; then
    if [[ -n $compile_asked ]]; then
        compile_decision="$compile_asked COMPILE=$compile_asked given"
    elif [[ -f $speed_figures ]]; then
        compile_decision=$(decide_compile "$speed_figures" "$acc_epochs")
    else
        compile_decision="0 no speed figures at $speed_figures and no COMPILE: eager"
    fi
    compile=${compile_decision%% *}
else
    compile=${compile_asked:-$(tiny 0 1)}
    compile_decision="$compile $( ((compile)) && echo "COMPILE=1: train-compile measures compiling" ||
                                  echo "COMPILE=0: no compiling, train-compile skipped")"
fi

print_plan() {
    local name
    echo "plan, part $part (real limits; LIMIT_SCALE $limit_scale applies to this session):"
    for name in "${steps[@]}"; do printf '  %-14s %4d s\n' "$name" "${LIMITS[$name]}"; done
    echo "worst case: the limits + ${#steps[@]} steps x (${KILL_GRACE} s kill grace + ${STEP_OVERHEAD} s archive)" \
         "= $worst_case s of the $CALL_BUDGET s a part may take"
    echo "both parts: speed $(worst speed) s + accuracy $(worst accuracy) s = $both_parts s of the" \
         "$SESSION_BUDGET s the two calls may take"
    echo "compile: ${compile_decision#* }"
}

within_budget() { ((worst_case <= CALL_BUDGET && both_parts <= SESSION_BUDGET)); }
if [[ $plan_only == 1 ]]; then
    print_plan
    within_budget
    exit
fi
within_budget || fail "worst cases over budget (part $part $worst_case s of $CALL_BUDGET s, both parts" \
                      "$both_parts s of $SESSION_BUDGET s): shorten LIMITS"

# --- where the results go

out=$(realpath -m "${OUT:-$(mktemp -d -t gpu-out.XXXXXX)}")
cd "$repo" || exit 2
mkdir -p "$out" || exit 2
work=$(mktemp -d -t gpu-session.XXXXXX)  # stage/: what the archive holds; runs/: run folders with checkpoints
stage=$work/gpu-session
runs=$work/runs
compile_file=$work/compile.txt  # the device step's verdict: "ok", or why compiling cannot work here
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
    { time timeout -k "$KILL_GRACE" "$limit" "$@" > "$out/$name.log" 2>&1; } 2> "$work/time"
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

wanted() { [[ -z $only || " ${only//,/ } " == *" $1 "* ]]; }  # wanted STEP: in ONLY, or no ONLY

keep() {  # keep FILE...: results into stage/ (when they are there), then the archive
    local file
    for file in "$@"; do [[ -f $file ]] && cp "$file" "$stage/"; done
    pack
}

keep_run() {  # keep_run RUN_FOLDER STAGE_FOLDER: a run's small files (no checkpoints) into the archive
    local file
    mkdir -p "$2"
    for file in metrics.csv summary.json log.txt config.json curves.png; do
        [[ -f $1/$file ]] && cp "$1/$file" "$2/"
    done
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

compile_problem() {  # prints why torch.compile cannot work here, nothing when it can; the tiny compile if asked
    local cc=${CC:-}
    if [[ -n $cc ]]; then
        command -v "${cc%% *}" > /dev/null || { echo "no C compiler: CC=$cc is not a command"; return; }
    else
        cc=$(command -v gcc || command -v clang) || { echo "no C compiler: no CC, no gcc or clang on PATH"; return; }
    fi
    echo "compile pre-flight: C compiler $cc ($("${cc%% *}" --version 2>&1 | head -n 1))" >&2
    python3 - <<'EOF' || return 0
import pathlib, sys, sysconfig
header = pathlib.Path(sysconfig.get_paths()["include"]) / "Python.h"
if not header.is_file():
    print(f"no Python headers: {header} is missing (Triton builds against them; install python3-dev)")
    sys.exit(1)
print(f"compile pre-flight: {header}", file=sys.stderr)
EOF
    if [[ $compile != 1 ]]; then
        echo "compile pre-flight: torch.compile not tried (COMPILE=0)" >&2
        return
    fi
    python3 - <<'EOF' >&2 || echo "torch.compile of a tiny function failed (its error is in device.log)"
import time, torch
device = "cuda" if torch.cuda.is_available() else "cpu"
started = time.perf_counter()
x = torch.linspace(-1, 1, 1024, device=device)
compiled = torch.compile(lambda t: torch.sin(t) * 2 + 1)
torch.testing.assert_close(compiled(x), torch.sin(x) * 2 + 1)
print(f"compile pre-flight: torch.compile of a tiny function works on {device} "
      f"({time.perf_counter() - started:.1f} s, compiling included)")
EOF
}

device_step() {
    local problem
    nvidia-smi || echo "(no nvidia-smi here)"
    python3 - <<'EOF' || return
import runpy, sys, torch
runpy.run_path("__init__.py", run_name="__main__")
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version())
EOF
    problem=$(compile_problem)
    echo "${problem:-ok}" > "$compile_file"
    echo "compile: ${problem:-usable}"
}

tests_step() {
    local args k=$tests_k plugin=()
    read -ra args <<< "$tests"
    # setup.cfg loads pytest-timeout by name (-p timeout), so pytest refuses to start without the plugin.
    if ! python3 -c "import pytest_timeout" 2> /dev/null; then
        echo "pytest-timeout is not installed here: running without it (-o addopts= drops setup.cfg's -p timeout;"
        echo "no per-test time limit then, only this step's)"
        plugin=(-o addopts=)
    fi
    if [[ -n $compile_unavailable ]]; then
        echo "compile unavailable ($compile_unavailable): leaving out the tests named for compile"
        k="${k:+($k) and }not compile"
    fi
    python3 -m pytest -v -x --durations=10 -p no:cacheprovider "${plugin[@]}" \
        --ignore=tests/test_gpu_session.py ${k:+-k "$k"} "${args[@]}"
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

side_by_side() {  # side_by_side NAME COMMAND [NAME COMMAND ...]: all at once, each line prefixed [NAME]
    local names=() pids=() status=0 code i
    while (($# >= 2)); do
        names+=("$1")
        ( set -o pipefail; bash -c "$2" 2>&1 | sed -u "s/^/[$1] /" ) &
        pids+=($!)
        shift 2
    done
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}"
        code=$?
        echo "[${names[$i]}] exit $code"
        ((code == 0)) || status=1
    done
    return "$status"
}

checks_step() {  # the CUDA tests and the deterministic runs, side by side: none of them is timed
    local jobs=() model
    [[ $tests == skip ]] || jobs+=(tests tests_step)
    for model in $det_models; do jobs+=("det-$model" "deterministic_step $model"); done
    ((${#jobs[@]})) || { echo "nothing to check (TESTS=skip, no DET_MODELS)"; return; }
    side_by_side "${jobs[@]}"
}

accuracy_run() {  # accuracy_run MODEL: the default recipe for ACC_EPOCHS epochs
    # shellcheck disable=SC2086  # acc_flags: flags, split on spaces
    python3 main_cifar10.py --model "$1" --epochs "$acc_epochs" --data-dir "$data_dir" --results-dir "$runs" \
        --tag "$acc_tag" --no-progress $acc_flags
}

accuracy_step() {
    local jobs=() model
    for model in $acc_models; do jobs+=("$model" "accuracy_run $model"); done
    side_by_side "${jobs[@]}"
}

export -f data_step compile_problem device_step tests_step reproducible_columns deterministic_step side_by_side \
          checks_step accuracy_run accuracy_step
export data_dir runs tests tests_k det_models det_epochs det_subset compile compile_file acc_models acc_epochs

# --- what the session keeps beside the logs

# speed.csv from pipeline.json's project rows and the compiled run's metrics.csv (training seconds: the pipeline
# bench times the training steps alone), both for an epoch of the compiled run's training images.
write_speed_figures() {  # write_speed_figures PIPELINE_JSON RUN_FOLDER
    python3 - "$1" "$2" "$run_model" > "$stage/speed.csv" <<'EOF'
import csv, json, statistics, sys
from pathlib import Path
pipeline_json, run_folder, model = sys.argv[1:]
try:
    train_images = json.loads((Path(run_folder) / "config.json").read_text())["train_images"]
except (OSError, ValueError, KeyError):
    train_images = 50_000  # a CIFAR-10 epoch with no validation held out, as the default recipe trains
print("mode,first_epoch_train_seconds,steady_epoch_train_seconds,source")
try:
    rows = [row for row in json.load(open(pipeline_json))["rows"]
            if row["model"] == model and row["pipeline"] == "project"]
except (OSError, ValueError, KeyError):
    rows = []
if rows:  # eager has no compiling: its first epoch is a steady one (cuDNN's autotuning, a few seconds, aside)
    epoch = train_images / rows[0]["images_per_second"]
    print(f"eager,{epoch:.3f},{epoch:.3f},pipeline.json {model} project ({len(rows[0]['seconds'])} timed rounds"
          f" at {rows[0]['images_per_second']:.0f} images/s for {train_images} images)")
try:
    seconds = [float(row["train_seconds"]) for row in csv.DictReader(open(Path(run_folder) / "metrics.csv"))]
except (OSError, KeyError, ValueError):
    seconds = []
if len(seconds) >= 2:
    print(f"compile,{seconds[0]:.3f},{statistics.median(seconds[1:]):.3f},"
          f"train-compile metrics.csv ({len(seconds)} epochs)")
EOF
    cp "$stage/speed.csv" "$out/speed.csv"
    mkdir -p "$(dirname "$speed_figures")" && cp "$stage/speed.csv" "$speed_figures"
    column -s, -t < "$stage/speed.csv" 2>/dev/null || cat "$stage/speed.csv"
    pack
}

write_accuracy_table() {  # accuracy.csv: each run's last epoch, test accuracies, seconds, the course's figure
    python3 - "$runs/cifar10" "$acc_tag" "$compile" $acc_models > "$stage/accuracy.csv" <<'EOF'
import csv, json, statistics, sys
from pathlib import Path
runs, tag, compiled, models = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
course = {row["model"]: round(float(row["valid_acc"]) / 100, 4) for row in csv.DictReader(
    line for line in open("core/course_report.csv") if not line.startswith("#")) if row["dataset"] == "cifar10"}
fields = ["model", "compile", "epochs_done", "val_acc", "test_acc", "final_test_acc", "first_epoch_seconds",
          "steady_epoch_seconds", "total_seconds", "course_report_valid_acc"]
table = csv.DictWriter(sys.stdout, fields, lineterminator="\n")
table.writeheader()
for model in models:
    folder = runs / f"{model}-{tag}"
    try:
        metrics = list(csv.DictReader(open(folder / "metrics.csv")))
    except OSError:
        metrics = []
    summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else {}
    seconds = [float(row["epoch_seconds"]) for row in metrics]
    table.writerow({"model": model, "compile": compiled, "epochs_done": len(metrics),
                    "val_acc": metrics[-1]["val_acc"] if metrics else "",
                    "test_acc": summary.get("test_acc", ""), "final_test_acc": summary.get("final_test_acc", ""),
                    "first_epoch_seconds": f"{seconds[0]:.2f}" if seconds else "",
                    "steady_epoch_seconds": f"{statistics.median(seconds[1:] or seconds):.3f}" if seconds else "",
                    "total_seconds": f"{sum(seconds):.1f}", "course_report_valid_acc": course.get(model, "")})
EOF
    cp "$stage/accuracy.csv" "$out/accuracy.csv"
    column -s, -t < "$stage/accuracy.csv" 2>/dev/null || cat "$stage/accuracy.csv"
    pack
}

# --- the session

echo "gpu_session: part $part, $(date -u '+%F %T') UTC on ${HOSTNAME:-?}; data $data_dir; results $out;" \
     "dry run: $dry_run"
print_plan
[[ $limit_scale == 1 ]] || echo "limits scaled by $limit_scale (each at least 5 s)"
[[ -z $only ]] || echo "ONLY: $only"
echo "step,limit_s,exit,seconds,cpu_seconds" > "$stage/steps.csv"
session_start=$(now)
failed=()  # the steps that did not end well: the session's exit status is 1 if there is any

if wanted data; then
    step data bash -c data_step && have_data=1 || have_data=0
else
    skip data "not in ONLY"
    [[ -f $data_dir/cifar-10-batches-py/batches.meta ]] && have_data=1 || have_data=0
fi

compile_unavailable=""  # why compiling cannot work here, as the device step found; empty: it can, or not checked
if wanted device; then
    step device bash -c device_step
    if [[ ! -f $compile_file ]]; then
        compile_unavailable="the device step ended before its compile pre-flight did"
    elif [[ $(< "$compile_file") != ok ]]; then
        compile_unavailable=$(< "$compile_file")
    fi
else
    skip device "not in ONLY"
fi
export compile_unavailable

if [[ $part == speed ]]; then
    if ! wanted checks; then
        skip checks "not in ONLY"
    elif ((have_data)); then
        step checks bash -c checks_step
        for model in $det_models; do
            for tag in det-a det-b; do
                keep_run "$runs/cifar10/$model-$tag" "$stage/det-$model/$tag"
            done
        done
    else
        skip checks "no data"
    fi

    if ! wanted pipeline; then
        skip pipeline "not in ONLY"
    elif ((have_data)); then
        read -ra extra <<< "$pipeline_args"
        step pipeline python3 bench/bench_pipeline.py --data-dir "$data_dir" --models "$pipeline_models" \
            --out "$out/pipeline.json" "${extra[@]}"
        keep "$out/pipeline.json"
    else
        skip pipeline "no data"
    fi

    run_tag=e$run_epochs-compile${subset:+-subset$subset}
    if ! wanted train-compile; then
        skip train-compile "not in ONLY"
    elif [[ $compile != 1 ]]; then
        skip train-compile "COMPILE=0"
    elif [[ -n $compile_unavailable ]]; then
        skip train-compile "compile unavailable: $compile_unavailable"
    elif ((have_data)); then
        step train-compile python3 main_cifar10.py --model "$run_model" --epochs "$run_epochs" --compile \
            ${subset:+--subset "$subset"} --data-dir "$data_dir" --results-dir "$runs" --tag "$run_tag" --no-progress
        keep_run "$runs/cifar10/$run_model-$run_tag" "$stage/train-compile"
    else
        skip train-compile "no data"
    fi
    if wanted pipeline || wanted train-compile; then
        echo "=== speed figures, also in $speed_figures for the accuracy part"
        write_speed_figures "$out/pipeline.json" "$stage/train-compile"
    fi

    if wanted models; then
        read -ra extra <<< "$models_args"
        step models python3 bench/bench_models.py ${models:+--models "$models"} --out "$out/models.json" \
            "${extra[@]}"
        keep "$out/models.json"
    else
        skip models "not in ONLY"
    fi
else
    if ((compile)) && [[ -n $compile_unavailable ]]; then
        echo "=== accuracy: ${compile_decision#* }, but compile is unavailable ($compile_unavailable): eager"
        compile=0
    fi
    acc_tag=acc-e$acc_epochs$( ((compile)) && echo -compile)${acc_subset:+-subset$acc_subset}
    acc_flags="$( ((compile)) && echo --compile) ${acc_subset:+--subset $acc_subset}"
    export acc_tag acc_flags compile
    if ! wanted accuracy; then
        skip accuracy "not in ONLY"
    elif ((have_data)); then
        echo "=== accuracy: $acc_models, $acc_epochs epochs each, side by side, $( ((compile)) && echo compiled ||
              echo eager) (${compile_decision#* })"
        step accuracy bash -c accuracy_step
        for model in $acc_models; do keep_run "$runs/cifar10/$model-$acc_tag" "$stage/accuracy/$model"; done
        write_accuracy_table
    else
        skip accuracy "no data"
    fi
fi

echo "=== done in $(since "$session_start")s; ${#failed[@]} step(s) failed${failed[*]:+: ${failed[*]}}; steps:"
column -s, -t < "$stage/steps.csv" 2>/dev/null || cat "$stage/steps.csv"
[[ -z $compile_unavailable ]] || echo "=== compile unavailable: $compile_unavailable"
if [[ $part == speed && -f $stage/speed.csv ]]; then
    decision=$(decide_compile "$speed_figures" 50)
    [[ -z $compile_unavailable ]] || decision="0 compile unavailable here: eager"
    echo "=== for call 2: PART=accuracy COMPILE=${decision%% *} bash bench/gpu_session.sh $data_arg"
    echo "    (${decision#* })"
fi
exec >&3 2>&4 3>&- 4>&-  # end tee, so that the last archive holds the whole session.log
wait "$tee_pid" 2>/dev/null
pack
((${#failed[@]} == 0))
