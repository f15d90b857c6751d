#!/usr/bin/env bash
# Does Diffold learn? Trains the `balanced` scenario on the shipped synthetic data for a fixed
# wall-clock budget and records the sampled validation curve (val/lddt, val/tm_score, ...).
# Usage: benchmarks/learning_run.sh OUT_DIR NAME MINUTES [--preset P] [--set KEY=VALUE ...]
set -euo pipefail
out=$1 name=$2 minutes=$3
shift 3
mkdir -p "$out"
MLFLOW_TRACKING_URI="sqlite:///$out/$name.db" python3 -m pipeline train --scenario balanced \
  --set trainer.time_limit_minutes="$minutes" --set trainer.epochs=10000 \
  --set output_dir="/tmp/learning-$name" "$@" > "$out/$name.log" 2>&1
