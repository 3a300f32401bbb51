#!/usr/bin/env bash
# Follow device/two_gpu_session.sh's background job for up to $1 seconds (keep it under the
# call's limit): prints the steps finished so far; once the job is done, copies its results
# (the *.tgz, the logs, the multi-GPU table) into $OUT.
JOB=${JOB:-/tmp/job}
end=$(( SECONDS + ${1:-540} ))
while [ ! -f $JOB/done ] && [ $SECONDS -lt $end ]; do sleep 5; done
cat $JOB/status 2>/dev/null
grep -h "STEP_WALL\|STEP FAILED" $JOB/out/*.log 2>/dev/null
tail -n 2 $JOB/out/lane_a.log $JOB/out/lane_b.log $JOB/out/multigpu.log 2>/dev/null
nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
if [ -f $JOB/done ]; then
  cp $JOB/out/*.tgz $JOB/out/multigpu.md $JOB/out/multigpu.json $OUT/ 2>/dev/null
  tar czf $OUT/logs.tgz -C $JOB/out --exclude='*.tgz' . 2>/dev/null
  echo "JOB DONE"
else
  echo "JOB RUNNING"
fi
