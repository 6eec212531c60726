#!/usr/bin/env bash
# The GPU half of the checks and benchmarks, in one call on a machine with a CUDA device:
#
#     bash benchmarks/device_check.sh            # logs in $OUT (default /tmp/device_check)
#                                                # one per step: tests.log, train.log, ...
#
# 1. tests/test_devices.py: the model on CUDA against the float64 CPU reference (outputs,
#    gradients, one step of both optimizers; every table layout; the fast attention kernel and
#    FlexAttention with gradients).
# 2. hashrec train --device cuda on the shipped sample, then hashrec evaluate of its checkpoint
#    on the CPU: the AUCs training recorded must come back.
# 3. bench_ranker.py (at its CPU shapes, and at batch 64 without FlexAttention),
#    bench_inference.py, bench_table.py, profile_train.py (the phases of a training step
#    and the costliest operators) and bench_train_step.py (whole steps by path, kernel and
#    compiling) with --device cuda.
#
# Runs from the repository root with the machine's own torch (no install: PYTHONPATH=src).
# Each step has its own time limit and the script goes on when one fails; a summary ends it.
# DEVICE=cpu REPEATS=2 CANDIDATES=64,256 bash benchmarks/device_check.sh: a dry run here.
# ONLY="tests ranker" runs those steps alone (names: tests train ranker ranker64 inference
# table profile steps); STEP_ARGS="--batch 32" adds options to bench_train_step.py; INFERENCE_ARGS="--candidates 20" adds options to bench_inference.py.
# Exit status: 0 when every step that ran exited 0, else 1.
set -u
STEPS="tests train ranker ranker64 inference table profile steps"
ONLY=${ONLY:-$STEPS}
DEVICE=${DEVICE:-cuda}
REPEATS=${REPEATS:-10}
CANDIDATES=${CANDIDATES:-256,1024,4096}
INFERENCE_ARGS=${INFERENCE_ARGS:-}
STEP_ARGS=${STEP_ARGS:---history 32,128 --batch 128,512 --compile default}
OUT=${OUT:-/tmp/device_check}
for s in $ONLY; do
    [[ " $STEPS " == *" $s "* ]] || { echo "ONLY: unknown step '$s' (steps: $STEPS)" >&2; exit 2; }
done
[[ $REPEATS =~ ^[1-9][0-9]*$ ]] || { echo "REPEATS must be a positive integer, got '$REPEATS'" >&2; exit 2; }
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SUMMARY=()
FAILED=0

wanted() { [[ " $ONLY " == *" $1 "* ]]; }

step() {  # step NAME SECONDS COMMAND...: log to $OUT/NAME.log, print its tail
    local name=$1 limit=$2 start rc
    shift 2
    local log="$OUT/${name%%_*}.log"  # train_evaluate: appended to train.log
    wanted "${name%%_*}" || return 0
    [[ $name == *_* ]] || : >"$log"
    echo "== $name: $*" | tee -a "$log"
    start=$(date +%s)
    timeout -k 10 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    [ "$rc" -eq 0 ] || FAILED=1
    SUMMARY+=("$name: exit $rc in $(($(date +%s) - start)) s")
    tail -n "${TAIL:-25}" "$log" | grep -v '^== '
}

if [ "$DEVICE" != cpu ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
    "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
fi

step tests 90 "$PY" -m pytest -q -p no:cacheprovider -x tests/test_devices.py

RUN=$(mktemp -d "${TMPDIR:-/tmp}/device_check_run.XXXXXX")  # outside $OUT: logs alone come back
step train 120 "$PY" -m hashrec train --device "$DEVICE" --seeds 1 --out "$RUN"
step train_evaluate 60 "$PY" -m hashrec evaluate --checkpoint "$RUN/checkpoint.safetensors" \
    --device cpu --out "$RUN/cpu_eval.json"
step train_compare 20 "$PY" - "$RUN" <<'EOF'
import json, sys
run = sys.argv[1]
train = json.load(open(f"{run}/metrics.json"))
cpu = json.load(open(f"{run}/cpu_eval.json"))
name = next(k for k in train["per_seed"] if k.startswith("hashed"))
want = train["per_seed"][name][0]["auc"]
got = next(v for k, v in cpu["results"].items() if k.startswith("hashed"))["auc"]
worst = 0.0
for action, a in want.items():
    b = got[action]
    if a == a:  # not NaN
        worst = max(worst, abs(a - b))
    print(f"{action:>16}: trained on the device {a:.5f}, evaluated on cpu {b:.5f}")
print(f"largest AUC difference {worst:.2e}")
sys.exit(0 if worst < 1e-3 else 1)
EOF

TAIL=40 step ranker 150 "$PY" benchmarks/bench_ranker.py --device "$DEVICE" \
    --candidates "$CANDIDATES" --repeats "$REPEATS"
TAIL=14 step ranker64 90 "$PY" benchmarks/bench_ranker.py --device "$DEVICE" --batch 64 \
    --candidates "$CANDIDATES" --repeats "$REPEATS" --no-flex --max-full-c 1024
TAIL=12 step inference 45 "$PY" benchmarks/bench_inference.py --device "$DEVICE" --ensemble 3 \
    --requests $((REPEATS * 20)) $INFERENCE_ARGS
TAIL=30 step table 60 "$PY" benchmarks/bench_table.py --device "$DEVICE" \
    --repeats "$REPEATS"
TAIL=60 step profile 120 "$PY" benchmarks/profile_train.py --device "$DEVICE" \
    --data src/hashrec/datasets/kuairand_sample --steps 30 --warmup 5 --ops 25
TAIL=20 step steps 240 "$PY" benchmarks/bench_train_step.py --device "$DEVICE" \
    --modes packed,packed_isolated,padded,padded_isolated $STEP_ARGS
rm -rf "$RUN"

echo
printf '%s\n' ${SUMMARY[@]+"${SUMMARY[@]}"}
exit "$FAILED"
