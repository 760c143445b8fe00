#!/usr/bin/env bash
# What do the capsules buy? Train the RCN and its ablations at the same budget on Fashion-MNIST
# `small`, each with every seed of SEEDS, evaluate each (test error, negative ELBO, IW bound,
# information, Frechet, class coverage, two-sample test, nearest neighbours, capsule usage, write
# window) and write one comparison page: a row per run and a row per variant over its seeds
# (mean +- half the range).
#
#   bash launch/ablate.sh [OUT_DIR] [key=value ...]      (default OUT_DIR: runs/ablate)
#   SEEDS="0 1 2" CAPS_INPUT=grey bash launch/ablate.sh
#
# Every row's encoder sees the same image: CAPS_INPUT (default binarized, the image DRAW's read
# and the likelihood see; grey gives the capsule rows the grey image, worth about 6 nats, which
# the DRAW rows cannot use); the page names it.
#
# Variants (docs/model.md, "What the capsules buy"):
#   rcn_strict   the RCN as the paper draws it: RNN_dec gets only the decoder capsules
#   enc_read_off the same with RNN_enc reading only the capsules and h_dec (model.enc_read=off)
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
  [enc_read_off]="model.dec_z_skip=false model.enc_read=off"
  [rcn_skip]="model.dec_z_skip=true"
  [no_dec_caps]="model.dec_capsules=false"
  [no_enc_caps]="model.enc_capsules=false model.margin_weight=0"
  [draw]="model.enc_capsules=false model.dec_capsules=false model.margin_weight=0"
)
runs=()
for seed in ${SEEDS:-0 1}; do
  for name in rcn_strict enc_read_off rcn_skip no_dec_caps no_enc_caps draw; do
    # shellcheck disable=SC2206  # the overrides are words on purpose
    extra=(${variants[$name]})
    run="$out/${name}_s$seed"
    "${rcn[@]}" train --preset small --data "$data" --out "$run" "${extra[@]}" \
      "train.seed=$seed" "data.caps_input=${CAPS_INPUT:-binarized}" "$@"
    "${rcn[@]}" eval --run "$run" --reduced
    runs+=("$run")
  done
done
"${rcn[@]}" report --runs "${runs[@]}" --out "$out"
echo "comparison in $out/report.md"
