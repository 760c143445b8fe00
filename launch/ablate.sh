#!/usr/bin/env bash
# What do the capsules buy? Train the RCN and its ablations at the same budget and seed on
# Fashion-MNIST `small`, evaluate each (test error, negative ELBO, IW bound, Frechet,
# nearest-neighbour ratio, capsule usage) and write one comparison page.
#
#   bash launch/ablate.sh [OUT_DIR] [key=value ...]      (default OUT_DIR: runs/ablate)
#
# Variants (docs/model.md, "What the capsules buy"):
#   rcn_strict   the RCN as the paper draws it: RNN_dec gets only the decoder capsules
#   rcn_skip     the same with z_t also fed to RNN_dec beside the decoder capsules
#   no_dec_caps  z_t straight to RNN_dec, as DRAW (encoder capsules kept)
#   no_enc_caps  no encoder capsule network: nothing for RNN_enc, no classifier
#   draw         neither capsule network, no classifier: plain DRAW
# Extra key=value arguments go to every `rcn train` (e.g. train.steps=1000 for a shorter budget).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/ablate}"
shift || true
rcn=(.venv/bin/rcn)
data="${RCN_DATA:-data/fashion-mnist}"
[[ -x "${rcn[0]}" ]] || bash launch/setup.sh
if [[ ! -f "$data/manifest.json" ]]; then
  "${rcn[@]}" prepare --dataset fashion-mnist --out "$data"
fi
declare -A variants=(
  [rcn_strict]="model.dec_z_skip=false"
  [rcn_skip]="model.dec_z_skip=true"
  [no_dec_caps]="model.dec_capsules=false"
  [no_enc_caps]="model.enc_capsules=false model.margin_weight=0"
  [draw]="model.enc_capsules=false model.dec_capsules=false model.margin_weight=0"
)
runs=()
for name in rcn_strict rcn_skip no_dec_caps no_enc_caps draw; do
  # shellcheck disable=SC2206  # the overrides are words on purpose
  extra=(${variants[$name]})
  "${rcn[@]}" train --preset small --data "$data" --out "$out/$name" "${extra[@]}" "$@"
  "${rcn[@]}" eval --run "$out/$name" --reduced
  runs+=("$out/$name")
done
"${rcn[@]}" report --runs "${runs[@]}" --out "$out"
echo "comparison in $out/report.md"
