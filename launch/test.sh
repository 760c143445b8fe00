#!/usr/bin/env bash
# The test suite, as CI runs it: set-up (incl. Slurm, MPI), the local Slurm cluster, pytest.
#
#   bash launch/test.sh               the full suite (unit, multi-process, Slurm, MPI)
#   bash launch/test.sh -m "not slow" the fast tier: unit tests and short training runs (a few
#                                     steps, a SIGTERM stop and exact resume on 1 and 2 ranks),
#                                     without Slurm; as any user once the system packages it reads
#                                     (Fashion-MNIST, shellcheck) are installed
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -eq 2 && "$1" == "-m" && "$2" == "not slow" ]]; then
  bash launch/setup.sh --dev
else
  bash launch/setup.sh --test
  bash slurm/local_cluster.sh start
  trap 'bash slurm/local_cluster.sh stop' EXIT
fi
set +e
.venv/bin/python -m pytest tests -p no:cacheprovider "$@"
rc=$?
set -e
if (( rc == 5 )); then
  echo "test.sh: pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit $rc
