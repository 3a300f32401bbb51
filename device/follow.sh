#!/usr/bin/env bash
# Follow device/start_recipe.sh's background job for up to SECONDS (default 540; keep it under the
# call's 10-minute limit) and print where it stands: the runner's step lines (run / skip / done in
# N s), the last lines of the step running now, the GPUs' use. Once the job is done, packs what the
# run wrote, without weights, datasets, feature arrays or gradients, into $OUT (a call brings back
# at most 8 files of 16 MiB): results.tgz (in parts of 15 MB if larger), runner.log, status.
#
#   bash device/follow.sh 540      # again in the next call until it prints JOB DONE / JOB FAILED
set -uo pipefail
source device/env.sh
[ -f "$JOB/status" ] || { echo "error: no job in $JOB (start one with device/start_recipe.sh)"; exit 2; }
end=$(( SECONDS + ${1:-540} ))
while [ ! -f "$JOB/done" ] && [ $SECONDS -lt $end ]; do sleep 5; done
run_dir=$(cat "$JOB/run_dir")
cat "$JOB/status"
grep -h "^\[runner\]" "$JOB/runner.log" 2>/dev/null
if [ ! -f "$JOB/done" ]; then
  step_log=$(ls -t "$run_dir"/logs/*.log 2>/dev/null | head -1)
  [ -n "$step_log" ] && { echo "--- $step_log"; tail -n 3 "$step_log"; }
  nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
  echo "JOB RUNNING"
  exit 0
fi
tail -n 5 "$JOB/runner.log" | grep -v "^\[runner\]"
tar czf "$JOB/results.tgz" --exclude='*.safetensors' --exclude='*.arrow' --exclude='*.npz' \
  --exclude='*.npy' --exclude='*.bin' --exclude='*.pt' --exclude='tokenizer*' \
  --exclude='bergson' --exclude='bergson_data' -C "$(dirname "$run_dir")" "$(basename "$run_dir")"
if [ "$(stat -c %s "$JOB/results.tgz")" -gt 15000000 ]; then
  split -b 15000000 "$JOB/results.tgz" "$OUT/results.tgz.part-"   # cat results.tgz.part-* | tar xz
else
  cp "$JOB/results.tgz" "$OUT/"
fi
cp "$JOB/runner.log" "$JOB/status" "$OUT/"
[ "$(ls "$OUT" | wc -l)" -le 8 ] || echo "warning: $(ls "$OUT" | wc -l) files in $OUT; a call brings back 8"
rc=$(cat "$JOB/rc")
if [ "$rc" = 0 ]; then echo "JOB DONE"; else echo "JOB FAILED (rc=$rc)"; exit 1; fi
