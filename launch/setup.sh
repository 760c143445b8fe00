#!/usr/bin/env bash
# Set up a fresh machine for rcn_dist: system packages (where apt is there), a virtual
# environment in .venv, torch, and the package with everything it uses.
#
#   bash launch/setup.sh          what training needs (Fashion-MNIST from Debian)
#   bash launch/setup.sh --test   plus what the tests need (Slurm, munge, MariaDB, OpenMPI)
#   bash launch/setup.sh --dev    plus the Python packages of the tests only (the fast tier)
#
# RCN_VENV picks another environment directory; RCN_TORCH another torch requirement (the
# default, torch==2.13.0, is the CPU build on these machines; on a GPU machine give your CUDA
# build, e.g. RCN_TORCH="torch==2.11.0").
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
want_dev=0
case "${1:-}" in
  --test) want_test=1; want_dev=1 ;;
  --dev) want_dev=1 ;;
esac
venv="${RCN_VENV:-.venv}"
torch_req="${RCN_TORCH:-torch==2.13.0}"

apt_pkgs=(dataset-fashion-mnist)
if (( want_test )); then
  apt_pkgs+=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server openmpi-bin libopenmpi-dev shellcheck)
fi
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if (( ${#missing[@]} )); then
  if command -v apt-get >/dev/null; then
    sudo_=""
    [[ $(id -u) -ne 0 ]] && sudo_="sudo"
    echo "setup: apt-get install ${missing[*]}"
    $sudo_ apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: no apt-get here; install ${missing[*]} yourself (Fashion-MNIST: any directory of the IDX files, then --source DIR)" >&2
  fi
fi

if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
fi
# torch first: installing deepspeed with no torch present pulls a multi-GB CUDA build.
"$venv/bin/python" -c "import torch" 2>/dev/null || "$venv/bin/pip" install -q "$torch_req"
extras="."
(( want_dev )) && extras=".[dev]"
"$venv/bin/pip" install -q -e "$extras"
echo "setup: ready ($("$venv/bin/python" -c 'from importlib.metadata import version as v; print("torch", v("torch"), "deepspeed", v("deepspeed"))'))"
