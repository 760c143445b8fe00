#!/usr/bin/env bash
# The quickstart: set up a fresh machine, then the main job on the embedded default
# (Fashion-MNIST from Debian's dataset-fashion-mnist, no network): prepare shards, train the
# `small` preset on CPU, evaluate, draw samples and write the report.
#
#   bash launch/quickstart.sh [RUN_DIR] [key=value ...]     (default RUN_DIR: runs/quickstart)
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
run_dir="${1:-runs/quickstart}"
shift || true
rcn=(.venv/bin/rcn)
data="${RCN_DATA:-data/fashion-mnist}"
if [[ ! -f "$data/manifest.json" ]]; then
  "${rcn[@]}" prepare --dataset fashion-mnist --out "$data"
fi
"${rcn[@]}" train --preset small --data "$data" --out "$run_dir" "$@"
"${rcn[@]}" eval --run "$run_dir" --reduced
"${rcn[@]}" sample --run "$run_dir"
"${rcn[@]}" report --run "$run_dir"
echo
echo "results in $run_dir: metrics.jsonl, eval.json, samples/, report.md"
