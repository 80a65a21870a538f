#!/usr/bin/env bash
# The paper's protocol (issue 15): 50 epochs, run from the repository root after
#   pip install -c constraints.txt -e '.[experiments]'
# Every command skips finished runs (an archived run needs only its metrics.csv and
# config.json) and resumes interrupted ones from their checkpoints: run this script again
# to continue after an interruption (Ctrl-C, or `kill` of the running kldwrm process, stops
# every worker at a step boundary; kill study.sh itself first so it does not go on).
# Runs land in docs/results/runs/<protocol>/<dataset>/<solver>/seed<k>/.
set -euo pipefail
cd "$(dirname "$0")/../.."
R=docs/results/runs
# the protocol's 50 epochs come right after the command, so that a step's own --epochs
# (later on the line; argparse keeps the last) wins
step() { local cmd=$1; shift; echo "== $(date -u +%FT%TZ) kldwrm $cmd $*"
         kldwrm "$cmd" --epochs 50 "$@" --workers "${WORKERS:-2}" --threads 1 --no-progress \
           > /dev/null; }
# Order: what answers the most questions first, so that a study cut short still covers
# every question (each protocol, both data sets, the regression task) with 5 seeds.
# MNIST, K-FAC / SO / Q, seeds 0-4, faithful as-released protocol and corrected protocol
step reproduce --as-released --solvers kfac so q --seeds 0-4 --out "$R/released"
step reproduce --solvers kfac so q --seeds 0-4 --out "$R/corrected"
# MNIST, K-FAC as released before the faithful mode (joint homogeneous bias block, damping
# 0.01), 10 epochs: the comparison of issue 14, both test views
step reproduce --empirical-fisher --solvers kfac --seeds 0-4 --out "$R/released-previous" --epochs 10
# Regression (eq. 35, the QE tests' task), 10 seeds (cheap: ~2 min for 20 runs), 30 epochs
step reproduce --task regression --solvers kfac so q qe --seeds 0-9 --out "$R/regression" --epochs 30
# Fashion-MNIST, corrected protocol: K-FAC / SO / Q 5 seeds
step reproduce --task fashion-mnist --solvers kfac so q --seeds 0-4 --out "$R/corrected"
# MNIST, seeds 5-9 (the paper's 10 seeds)
step reproduce --as-released --solvers kfac so q --seeds 5-9 --out "$R/released"
step reproduce --solvers kfac so q --seeds 5-9 --out "$R/corrected"
# QE (about 50 min per 50-epoch run on 2 cores): MNIST as many seeds as fit (at least 3),
# Fashion-MNIST 2 seeds
step reproduce --as-released --solvers qe --seeds 0-2 --out "$R/released"
step reproduce --solvers qe --seeds 0-2 --out "$R/corrected"
step reproduce --task fashion-mnist --solvers qe --seeds 0-1 --out "$R/corrected"
# More QE seeds on MNIST ("more when a GPU is lent"): seeds 3-4 of both protocols ran on a
# lent H200 (--device cuda; see README), the corrected pair was stopped at epochs 42/44 and is
# finished here on the CPU. Then, on the CPU, as-released seeds 5-6 on one core and corrected
# seed 5 on the other (a corrected QE run takes about 50 minutes here, an as-released one 40)
step reproduce --solvers qe --seeds 3-4 --out "$R/corrected"
WORKERS=1 step reproduce --as-released --solvers qe --seeds 5-6 --out "$R/released" &
WORKERS=1 step reproduce --solvers qe --seeds 5 --out "$R/corrected" &
wait
