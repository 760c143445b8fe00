#!/usr/bin/env bash
# The GPU check for one H100/H200-class machine without network access (rcn_dist/bench/gpu_check.py),
# at most 8 minutes on one H100: the real training path first (`torchrun --nproc_per_node 1
# launch/train.py --deepspeed configs/ds.json --preset mnist` for 30 steps, again with a SIGTERM at
# step 12 and the exact resume, then `rcn eval --reduced`), the bf16- and fp16-engine numerics at
# T = 64, a bf16 step against fp32, fp16 with loss scaling, ZeRO-2/3 on NCCL; then the benchmark
# table: a batch sweep, kernels per step and the GPU's busy fraction, eager against
# train.compile=steps against train.cuda_graphs.
#
#   bash launch/gpu_check.sh [--wheels DIR] [--out DIR] [--device cuda|cpu] [--data DIR]
#
# --wheels DIR: wheels to install offline where the image lacks them (pip install --no-index):
#   deepspeed (pure: `pip wheel --no-deps deepspeed==0.19.8`), hjson, pydantic, pydantic-core
#   (cp312), annotated-types, typing-inspection, typing-extensions>=4.16, webdataset, braceexpand,
#   submitit. Built on a machine with network: `pip download -d DIR --only-binary=:all:
#   --python-version 3.12 --no-deps ...` plus the deepspeed wheel.
# --out DIR: where checks.jsonl, bench.jsonl and bench.md go (default: $OUT if set, else
#   runs/gpu_check). --device cpu: the dry run (tiny sizes, gloo), what the tests run.
# --data DIR: prepared 28x28 shards (default data/fashion-mnist, prepared from Debian's
#   dataset-fashion-mnist files where they are missing and the files are there).
# Exit status: 0 all checks passed, 1 a check failed, 2 the machine is not usable.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels="" out="${OUT:-runs/gpu_check}" device=cuda data=data/fashion-mnist
while (( $# )); do
  case "$1" in
    --wheels) wheels="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    --data) data="$2"; shift 2 ;;
    *) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
py="${RCN_PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
fi
# The GPU image sets 9.0a, which DeepSpeed's op builder cannot parse when it JIT-builds FusedAdam.
export TORCH_CUDA_ARCH_LIST=9.0
# One process, one GPU: rank variables of an outer launcher must not leak in.
unset RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT

missing=$("$py" - <<'EOF'
import importlib.util
print(" ".join(m for m in ("deepspeed", "webdataset", "submitit", "rcn_dist") if importlib.util.find_spec(m) is None))
EOF
)
if [[ -n "$missing" ]]; then
  if [[ " $missing " != " rcn_dist " ]]; then
    [[ -n "$wheels" ]] || { echo "gpu_check.sh: missing $missing: pass --wheels DIR (no network here)" >&2; exit 2; }
    "$py" -m pip install -q --no-index --find-links "$wheels" deepspeed webdataset submitit
  fi
  # The package itself, without touching the image's torch.
  "$py" -m pip install -q --no-deps --no-build-isolation -e .
fi
if [[ "$device" == cuda ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
if [[ ! -f "$data/manifest.json" && -d /usr/share/datasets/fashion-mnist ]]; then
  "$py" -m rcn_dist prepare --dataset fashion-mnist --out "$data"
fi
"$py" -m rcn_dist.bench.gpu_check --device "$device" --out "$out" --data "$data"
