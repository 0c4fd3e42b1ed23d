#!/usr/bin/env bash
# The `weco observe` guide's shell quick start, including its branching example,
# run against the local journal: no network and no credentials needed.
#
#   bash examples/quickstart.sh            # uses the `weco` on PATH
#
# `weco` is this package's script (the official `weco` package installs one of the
# same name; in an environment that has both, set WECO="python -m weco_observe").
# The journal is $WECO_OBSERVE_DIR when set, else the user data dir; run it with
# WECO_OBSERVE_DIR=$(mktemp -d) to keep your own journal clean. It works in the
# current directory and creates a toy train.py there if none exists.
set -euo pipefail

WECO=${WECO:-weco}
weco() { command $WECO "$@"; }  # `command`: the program, not this function

[ -f train.py ] || printf 'BATCH_SIZE = 16_384\nDEPTH = 8\n' > train.py

# 1. Initialize a run (records the baseline code as step 0; prints only the id)
WECO_RUN_ID=$(weco observe init \
  --name "my-experiment" \
  --metric val_bpb \
  --goal min \
  --source train.py)
echo "run: $WECO_RUN_ID"

# 2. Log experiments
# Log baseline result (step 0)
weco observe log \
  --run-id "$WECO_RUN_ID" \
  --step 0 \
  --status completed \
  --description "baseline" \
  --metrics '{"val_bpb": 2.366, "memory_gb": 0.0}' \
  --source train.py

# Log an experiment
sed -i 's/BATCH_SIZE = .*/BATCH_SIZE = 32_768/' train.py
weco observe log \
  --run-id "$WECO_RUN_ID" \
  --step 1 \
  --status completed \
  --description "increase batch size to 32K" \
  --metrics '{"val_bpb": 2.261, "memory_gb": 0.0}' \
  --source train.py

# The guide then logs a failed step 2; this walk-through keeps step 2 as the current
# best so that its branching example below reads exactly as in the guide.
sed -i 's/DEPTH = .*/DEPTH = 10/' train.py
weco observe log \
  --run-id "$WECO_RUN_ID" \
  --step 2 \
  --status completed \
  --description "deeper model" \
  --metrics '{"val_bpb": 2.2, "memory_gb": 0.0}' \
  --source train.py

# Branching and tree structure.
# Step 2 is the current best
# Step 3 failed - we revert to step 2 and try something different
weco observe log --run-id "$WECO_RUN_ID" --step 3 --status failed \
  --description "tried X, didn't work" --metrics '{"val_bpb": 2.5}'

# Step 4 branches from step 2, not the failed step 3
weco observe log --run-id "$WECO_RUN_ID" --step 4 --parent-step 2 \
  --status completed --description "tried Y instead" --metrics '{"val_bpb": 2.1}'

# Everything is journaled locally; `weco observe sync` (or the background syncer)
# delivers it to the Weco API later.
weco observe status
