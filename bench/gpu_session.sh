#!/usr/bin/env bash
# The checks to run, in one go, when a session is lent a GPU (about 9 minutes of device time):
#
#   bash bench/gpu_session.sh DATA_DIR        # DATA_DIR holds cifar-10-batches-py/
#
# In order of importance: the device, the test suite (CUDA-only bugs), the pipeline benchmark for
# ResNet-18 and BaseCNN (project batches against DataLoader/PIL), a 20-epoch ResNet-18 run with
# torch.compile (seconds per epoch, test accuracy), and the throughput of every model (in --list-models
# order, as many as its limit allows: rows print as they are measured). Each step has
# its own time limit, so one that hangs does not cost the others. Logs, JSON and the run's metrics,
# summary and curves go to $OUT (the device tool's output folder), or to gpu-out/ when OUT is unset.
set -u
data_dir=${1:?usage: bash bench/gpu_session.sh DATA_DIR}
out=${OUT:-gpu-out}
limit_scale=${LIMIT_SCALE:-1}  # e.g. 0.1 to rehearse the plumbing on a CPU in a minute
mkdir -p "$out"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run it under its limit, keep its log, show its end
    local name=$1 limit
    limit=$(python3 -c "print(max(5, round($2 * $limit_scale)))")
    shift 2
    echo "=== $name: $* (limit ${limit}s, $(date +%T))"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "=== $name: exit $? ($(date +%T))"
    tail -n 30 "$out/$name.log"
}

step device 30 bash -c "nvidia-smi; python3 __init__.py"
step tests 100 python3 -m pytest -q -x tests
step pipeline 150 python3 bench/bench_pipeline.py --data-dir "$data_dir" \
    --models cnn_resnet18,cnn_base --out "$out/pipeline.json"
runs=$(mktemp -d)  # checkpoints stay out of $OUT: they are too big to bring back
step resnet18 170 python3 main_cifar10.py --model cnn_resnet18 --epochs 20 --compile \
    --data-dir "$data_dir" --results-dir "$runs" --tag e20-compile --no-progress
mkdir -p "$out/resnet18"
cp "$runs"/cifar10/*/*.{csv,json,txt,png} "$out/resnet18/" 2>/dev/null
step models 90 python3 bench/bench_models.py --out "$out/models.json"
