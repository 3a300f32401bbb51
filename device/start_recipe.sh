#!/usr/bin/env bash
# Start a recipe on the lent GPU machine as one background job that outlives this call (setsid),
# after device/setup.sh 1 and 2 (3 for the SAE recipes). device/follow.sh follows it and brings
# the results back.
#
#   bash device/start_recipe.sh recipes/m1.toml --run-dir runs/m1 \
#       --var dataset=../shared/data/chat/alpacaeval_chat_10models.jsonl.gz \
#       --var "dataset_flags=--group-column instruction_id" --var model=runs/models/SmolLM2-135M-Instruct
#
# Everything after RECIPE goes to run_experiment.py as it is (--run-dir, --seeds, --var, --force).
# Two recipes side by side on a 2-GPU machine: one job folder and one GPU each,
#   JOB=/tmp/job_a CUDA_VISIBLE_DEVICES=0 bash device/start_recipe.sh recipes/smoltalk.toml ...
#   JOB=/tmp/job_b CUDA_VISIBLE_DEVICES=1 bash device/start_recipe.sh recipes/smoltalk_planted.toml ...
# The job folder $JOB holds: command, run_dir, runner.log (the runner's output), status, pid, and
# rc + done once it ends. A killed job resumes where it stopped when started again (the runner
# skips finished steps).
set -euo pipefail
source device/env.sh
[ $# -ge 1 ] || { echo "usage: bash device/start_recipe.sh RECIPE [run_experiment.py args...]"; exit 2; }
if [ -f "$JOB/pid" ] && [ ! -f "$JOB/done" ] && kill -0 "$(cat "$JOB/pid")" 2>/dev/null; then
  echo "error: a job is still running in $JOB (pid $(cat "$JOB/pid")); follow it with device/follow.sh"
  exit 2
fi
# the recipe and its vars are checked now, so a typo fails this call and not the background job;
# the run folder is where follow.sh finds the steps' logs and the results
run_dir=$("$PY" -c '
import sys
from pathlib import Path
import run_experiment as rx
args = rx.parse_args(sys.argv[1:])
try:
    print(rx.load_recipe(Path(args.recipe), args.run_dir, args.seeds, args.var).run_dir)
except rx.RunnerError as err:
    sys.exit(f"error: {err}")
' "$@")
rm -rf "$JOB"; mkdir -p "$JOB"
command=("$PY" run_experiment.py "$@" --python "$PY")
printf '%q ' "${command[@]}" > "$JOB/command"; echo >> "$JOB/command"
echo "$run_dir" > "$JOB/run_dir"
echo "started $(date -u +%FT%TZ): $(cat "$JOB/command")" > "$JOB/status"
JOB=$JOB setsid bash -c '"$@" > "$JOB/runner.log" 2>&1; rc=$?; echo $rc > "$JOB/rc"
  echo "finished $(date -u +%FT%TZ) rc=$rc" >> "$JOB/status"; touch "$JOB/done"' \
  job "${command[@]}" < /dev/null > /dev/null 2>&1 &
echo $! > "$JOB/pid"
echo "started job $(cat "$JOB/pid") in $JOB: run folder $run_dir"
