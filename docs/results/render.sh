#!/usr/bin/env bash
# Regenerate every table, figure and statistics file under docs/results/ from the archived
# runs in docs/results/runs/ (run from the repository root; about a minute). study.sh
# produces the runs; this script only reads them.
set -euo pipefail
cd "$(dirname "$0")/../.."
R=docs/results/runs
O=docs/results/paper-protocol
report() { kldwrm report "$@" > /dev/null; }
have() { for d in "$@"; do [ -d "$R/$d" ] || { echo "skipped: no $R/$d yet"; return 1; }; done; }
# the paper's protocol, 50 epochs: one report per protocol (MNIST and Fashion-MNIST)
! have corrected || report "$R/corrected" --epoch 50 --out "$O/corrected"
! have released || report "$R/released" --epoch 50 --out "$O/released"
! have corrected released || report --protocols corrected="$R/corrected" \
  released="$R/released" --epoch 50 --out "$O/comparison-epoch50.md"
# issue 14: the faithful as-released mode at epoch 10, beside the mode before it (K-FAC)
! have released || report "$R/released" --epoch 10 --out "$O/released-epoch10"
! have released released-previous || report --protocols faithful="$R/released" \
  previous="$R/released-previous" --epoch 10 --out "$O/faithful-vs-previous-epoch10.md"
# the regression task of eq. 35 (30 epochs)
! have regression || report "$R/regression" --epoch 30 --out "$O/regression"
# the generated tables of README.md (status, MNIST and Fashion-MNIST tables and tests)
python3 docs/results/readme.py
