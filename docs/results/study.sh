#!/usr/bin/env bash
# The paper's protocol (issue 15): 50 epochs, run from the repository root after
#   pip install -c constraints.txt -e '.[experiments]'
# Every command skips finished runs (an archived run needs only its metrics.csv and
# config.json) and resumes interrupted ones from their checkpoints: run this script again
# to continue after an interruption (Ctrl-C stops every worker at a step boundary).
# Runs land in docs/results/runs/<protocol>/<dataset>/<solver>/seed<k>/.
set -euo pipefail
cd "$(dirname "$0")/../.."
R=docs/results/runs
W=(--workers "${WORKERS:-2}" --threads 1 --no-progress --epochs 50)
step() { echo "== $(date -u +%FT%TZ) kldwrm $*"; kldwrm "$@" "${W[@]}" > /dev/null; }
# MNIST, K-FAC / SO / Q, 10 seeds, faithful as-released protocol and corrected protocol
step reproduce --as-released --solvers kfac so q --seeds 0-4 --out "$R/released"
step reproduce --solvers kfac so q --seeds 0-4 --out "$R/corrected"
step reproduce --as-released --solvers kfac so q --seeds 5-9 --out "$R/released"
step reproduce --solvers kfac so q --seeds 5-9 --out "$R/corrected"
# MNIST, QE: as many seeds as fit (at least 3)
step reproduce --as-released --solvers qe --seeds 0-2 --out "$R/released"
step reproduce --solvers qe --seeds 0-2 --out "$R/corrected"
