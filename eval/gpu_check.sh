#!/usr/bin/env bash
# The GPU check, one command from the repository root of a machine with a CUDA GPU:
#
#   bash eval/gpu_check.sh [OUT]        (OUT: $OUT, else out/gpu_check)
#
#   (a) installs the wheels carried in .whl/ that the machine lacks: .whl/jax/* (e.g.
#       ml-collections, which the trainer's optimizer config needs) into /tmp/site for every
#       process; .whl/fla/* (fla-core) into /tmp/fla_site, on the path of the torch process
#       alone, so that nothing there can shadow what JAX uses;
#   (b) python -m eval.gpu_correctness: every op and impl against the float64 reference;
#   (b') python -m eval.bench_phases: each Pallas phase timed under several block policies;
#   (c) python -m eval.bench_ops --backend gpu: the ops' speed, memory and compile time, with
#       fla's kernels and torch's flash attention in a process of their own;
#   (d) python -m eval.bench_model --backend gpu: tokens/s and MFU of the GDN, hybrid and
#       transformer language models (d_model 1024, 4 layers, B=2, T=8192, bf16).
#
# Each part runs under `timeout` and a time budget of its own (seconds; override with the
# variables below), so the whole stays under about 9 minutes; each part writes its results as
# they come. $OUT ends up with 9 files: gpu_check.log (everything printed), gpu_correctness.json,
# phases/results.json / phases.png, bench_ops.jsonl / .json / .png, bench_model.json / .png
# (PARTS chooses the parts: the device tool brings back 8 files at most).
#
# SMOKE=1 runs the same plumbing on a CPU at toy sizes (to test this script without a GPU).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-${1:-out/gpu_check}}
PY=${PYTHON:-python3}
CORRECTNESS_S=${CORRECTNESS_S:-140}   # wall limits of the parts; each gets a budget 20-40 s
OPS_S=${OPS_S:-270}                   # under its limit, so it stops by itself and writes
MODEL_S=${MODEL_S:-120}               # its files
PEER_S=${PEER_S:-110}                 # of OPS_S, for the fla / torch process
PHASES_S=${PHASES_S:-100}
PARTS=${PARTS:-correctness phases bench_ops bench_model}   # which parts run, in this order
OPS_ARGS=${OPS_ARGS:-}                # more arguments for bench_ops (e.g. --shapes 4x4096)
CORR_ARGS=${CORR_ARGS:-}              # more arguments for gpu_correctness (e.g. --ops gdn)
PHASE_VARIANTS=${PHASE_VARIANTS:-default warps8 tile128 seq_tile32}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false MEMLM_NO_PROGRESS=1 \
  PIP_ROOT_USER_ACTION=ignore

install_missing() {  # install_missing DIR TARGET: the wheels in DIR whose package is not here
  local w dist todo=()
  for w in "$1"/*.whl; do
    [ -e "$w" ] || continue
    dist=$(basename "$w" | cut -d- -f1)
    if "$PY" -m pip show "$dist" >/dev/null 2>&1; then
      echo "wheels: $dist is installed here already; $w not used"
    else
      todo+=("$w")
    fi
  done
  if [ ${#todo[@]} -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$2" "${todo[@]}" && echo "wheels: ${todo[*]##*/} -> $2"
  fi
}

part() {  # part NAME SECONDS CMD...: run under timeout (if NAME is in PARTS), record its status
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  [[ " $PARTS " == *" $name "* ]] || return 0
  echo
  echo "===== $name (limit ${limit}s): $*"
  timeout -k 15 "$limit" "$@"
  rc=$?
  echo "===== $name: exit $rc$([ $rc = 124 ] && echo ' (timed out)') after $((SECONDS - t0)) s"
  STATUS+=("$name=$rc")
}

main() {
  STATUS=()
  echo "gpu_check $(date -u +%FT%TZ) in $PWD, commit $(git rev-parse --short HEAD 2>/dev/null)"
  nvidia-smi -L 2>/dev/null || echo "nvidia-smi: none"
  install_missing .whl/jax /tmp/site
  install_missing .whl/fla /tmp/fla_site
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" - <<'EOF'
import importlib
for name in ("jax", "jaxlib", "flax", "optax", "ml_collections", "torch", "triton"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as e:  # noqa: BLE001
        print(f"{name}: {type(e).__name__}: {e}")
EOF
  if [ "${SMOKE:-0}" = 1 ]; then
    part correctness "$CORRECTNESS_S" "$PY" -m eval.gpu_correctness --small \
      --ops gdn la_gk attn --attn_impls auto xla --time_budget $((CORRECTNESS_S - 30)) \
      --out "$OUT"
    part phases "$PHASES_S" "$PY" -m eval.bench_phases --ops gdn --B 1 --T 128 --H 2 --K 16 \
      --V 16 --reps 1 --variants $PHASE_VARIANTS --out "$OUT/phases"
    part bench_ops "$OPS_S" "$PY" -m eval.bench_ops --backend cpu --quick --ops gdn attn \
      --shapes 1x128 --heads 2 --head_dim 16 --peers on --peer_budget "$PEER_S" \
      --fla_path /tmp/fla_site --time_budget $((OPS_S - 40)) --out "$OUT" $OPS_ARGS
    part bench_model "$MODEL_S" "$PY" -m eval.bench_model --quick --lengths 64 \
      --time_budget $((MODEL_S - 40)) --out "$OUT"
  else
    part correctness "$CORRECTNESS_S" "$PY" -m eval.gpu_correctness \
      --time_budget $((CORRECTNESS_S - 30)) --out "$OUT" $CORR_ARGS
    part phases "$PHASES_S" "$PY" -m eval.bench_phases --ops gdn la_g \
      --variants $PHASE_VARIANTS --out "$OUT/phases"
    part bench_ops "$OPS_S" "$PY" -m eval.bench_ops --backend gpu --peer_budget "$PEER_S" \
      --fla_path /tmp/fla_site --fla_unsafe_bwd --time_budget $((OPS_S - 30)) --out "$OUT" \
      $OPS_ARGS
    part bench_model "$MODEL_S" "$PY" -m eval.bench_model --backend gpu \
      --time_budget $((MODEL_S - 40)) --out "$OUT"
  fi
  echo
  echo "gpu_check: ${STATUS[*]}; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
  for s in "${STATUS[@]}"; do [ "${s#*=}" = 0 ] || return 1; done
}

main 2>&1 | tee "$OUT/gpu_check.log"
