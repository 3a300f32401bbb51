#!/usr/bin/env bash
# One lease of a 2-GPU machine, after setup_stage1/2: issue 6's two real runs side by side and
# issue 7's multi-GPU check, as one background job (started with setsid, so it outlives the call
# that starts it; device/wait_job.sh follows it and brings the results back):
#   GPU 0: recipes/smoltalk.toml on the AlpacaEval chat data, seeds 42 1 2   ($RUN_A)
#   GPU 1: recipes/smoltalk_planted.toml (20 % corrupted train_base)        ($RUN_B),
#          then multigpu.sh's 1-process steps and a profiled finetune of 10 steps
#   both:  multigpu.sh's 2-process steps and benchmarks/multigpu_compare.py's table.
# The 1-process steps share the host with the other GPU's lane (32 cores, separate GPUs).
# Rehearsed on the CPU with PY="uv run python" MODEL=<tiny model> TRAIN=40 ... MAXLEN=256.
set -uo pipefail
JOB=${JOB:-/tmp/job}
mkdir -p $JOB/out
export OUT=$JOB/out
source device/env.sh
RUN_A=${RUN_A:-runs/smoltalk_3seeds} RUN_B=${RUN_B:-runs/smoltalk_planted}
MAXLEN=${MAXLEN:-2048} MG_TRAIN=${MG_TRAIN:-1000}
COMMON=(--var "dataset=$CHAT_DATA" --var "dataset_flags=--group-column instruction_id"
        --var "model=$MODEL" --var "train_size=$TRAIN" --var "query_size=$QUERY"
        --var "eval_size=$EVAL" --var "k=$K" --var "max_length=$MAXLEN")
echo "started $(date -u +%FT%TZ)" > $JOB/status

( export CUDA_VISIBLE_DEVICES=0 LOG=$OUT/lane_a.log
  t smoltalk_3seeds $PY run_experiment.py recipes/smoltalk.toml --run-dir $RUN_A --seeds 42 1 2 \
    "${COMMON[@]}" --var eval_batch_size=${EVAL_BATCH:-16} ${RECIPE_A_EXTRA:-}
) & lane_a=$!

( export CUDA_VISIBLE_DEVICES=1 LOG=$OUT/lane_b.log
  t smoltalk_planted $PY run_experiment.py recipes/smoltalk_planted.toml --run-dir $RUN_B \
    "${COMMON[@]}" --var corrupt_fraction=0.2 --var sae_layer=$SAE_LAYER \
    --var sae_tokens=$SAE_TOKENS ${RECIPE_B_EXTRA:-}
  LOG=$OUT/multigpu.log MG_PHASE=single TRAIN=$MG_TRAIN bash device/multigpu.sh
  MG=${MG_RUN:-runs/multigpu}
  t profile_finetune $PY finetune.py train --manifest $MG/manifest.json --base-model $MODEL \
    --output-dir $MG/adapter_profiled --max-steps 30 --profile-steps 10 --eval-split none \
    --overwrite $EXTRA
) & lane_b=$!

wait $lane_a; rc_a=$?
wait $lane_b; rc_b=$?
echo "lane_a rc=$rc_a lane_b rc=$rc_b $(date -u +%FT%TZ)" >> $JOB/status
LOG=$OUT/multigpu.log MG_PHASE=multi TRAIN=$MG_TRAIN bash device/multigpu.sh; rc_mg=$?
echo "multigpu rc=$rc_mg $(date -u +%FT%TZ)" >> $JOB/status

# what comes back: results, reports, logs and metrics; no weights, no data, no feature arrays
pack() { tar czf $OUT/$1.tgz --exclude='*.safetensors' --exclude='*.arrow' --exclude='*.npz' \
           --exclude='tokenizer*' --exclude='*.pt' --exclude='*.bin' "${@:2}" 2>/dev/null; }
pack smoltalk_3seeds $RUN_A
pack smoltalk_planted $RUN_B
pack multigpu ${MG_RUN:-runs/multigpu}
touch $JOB/done
