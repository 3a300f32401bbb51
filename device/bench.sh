#!/usr/bin/env bash
# The benchmark launcher on the GPU machine, after device/setup.sh 1, 2 and 3 (sae-lens).
#
#   bash device/bench.sh
#       benchmarks/bench.py: every GPU step against its hardware floor on BENCH_ROWS rows of RUN's
#       train_base (RUN's split is made first if RUN has no manifest.json: AlpacaEval, BENCH_TRAIN
#       train_base rows, 500 query, 500 eval, seed 42), each finetune.py / score.py configuration
#       of bench.py's defaults (BENCH_EXTRA adds or replaces), the score/eval/SAE steps through the
#       adapter bench.py trains first, and a small SAE trained first for the sae_analysis row.
#       It runs for ~15 minutes: start it as a background job (setsid ... &) and follow its log.
#   BENCH=multigpu NPROC=2 bash device/bench.sh
#       the 1-process vs NPROC-process check of every data-parallel step on the same data, then
#       benchmarks/multigpu_compare.py's speed-up / agreement table. finetune: 1 process with
#       NPROC x gradient accumulation vs NPROC processes (the same optimizer steps).
#       MG_PHASE=single runs only the 1-process steps (on whatever GPU CUDA_VISIBLE_DEVICES
#       leaves, e.g. while another is busy), MG_PHASE=multi then the N-process steps and the
#       table; the default, all, runs both in turn (split it so each call stays under 10 minutes).
# Results go to $OUT. Rehearsed on the CPU over gloo with PY=.venv/bin/python MODEL=<tiny model>
# TRAIN=40 QUERY=8 EVAL=8 K=8 EXTRA="--max-length 256" (bench.py needs --allow-cpu there).
set -euo pipefail
source device/env.sh
RUN=${RUN:-runs/bench_split}
SAE_LAYER=${SAE_LAYER:-15}
EXTRA=${EXTRA:-}   # extra flags for every script taking --max-length (the tiny model needs 256)

bench_steps() {
  if [ ! -f $RUN/manifest.json ]; then
    t dataset $PY dataset.py --run-dir $RUN --dataset-name $CHAT_DATA --group-column instruction_id \
      --train-size ${BENCH_TRAIN:-1500} --query-size 500 --eval-size 500 --seed 42 --overwrite
  fi
  t train_sae_small $PY train_sae.py --manifest $RUN/manifest.json --split train_base --base-model $MODEL \
    --layer $SAE_LAYER --d-sae 4096 --k 32 --tokens ${BENCH_SAE_TOKENS:-1000000} --output-dir $RUN/local_sae --overwrite $EXTRA
  local bench_extra; eval "bench_extra=(${BENCH_EXTRA:-})"   # shell words: a variant's flags in quotes
  t bench $PY benchmarks/bench.py --manifest $RUN/manifest.json --base-model $MODEL \
    --sae-path $RUN/local_sae --rows ${BENCH_ROWS:-1000} --output-dir runs/bench $EXTRA "${bench_extra[@]}"
  cp runs/bench/bench.json runs/bench/bench.md "$OUT"/
  cp runs/bench/profile_finetune.txt "$OUT"/ 2>/dev/null || true
  tar czf "$OUT"/bench_logs.tgz runs/bench/logs
}

bench_multigpu() {
  local NPROC=${NPROC:-2} MG=${MG_RUN:-runs/multigpu} PHASE=${MG_PHASE:-all}
  local TRAIN=${TRAIN:-1000} QUERY=${QUERY:-500} EVAL=${EVAL:-500} K=${K:-500}
  local TORCHRUN="$PY -m torch.distributed.run --standalone --nproc-per-node $NPROC" M=$MG/manifest.json
  case $PHASE in all|single|multi) ;; *) echo "error: MG_PHASE must be all, single or multi"; exit 2;; esac
  if [ $PHASE != multi ]; then
    t dataset $PY dataset.py --run-dir $MG --dataset-name $CHAT_DATA --group-column instruction_id \
      --train-size $TRAIN --query-size $QUERY --eval-size $EVAL --seed 42 --overwrite
    t finetune_1 $PY finetune.py train --manifest $M --base-model $MODEL --output-dir $MG/adapter_1 \
      --gradient-accumulation $NPROC --lora-dropout 0 --overwrite $EXTRA
    t eval_loss_1 $PY eval_loss.py --manifest $M --adapter-path $MG/adapter_1 --skip-base --batch-size 16 \
      --output-json $MG/eval_1.json $EXTRA
    t score_1 $PY score.py --manifest $M --adapter-path $MG/adapter_1 --output-dir $MG/score_1 \
      --score-mode mean --preconditioning-mode query --projection-dim 32 --subset-k $K --nproc 1 --overwrite $EXTRA
    t train_sae $PY train_sae.py --manifest $M --split train_base --base-model $MODEL --layer $SAE_LAYER \
      --d-sae ${MG_D_SAE:-4096} --k 32 --tokens ${MG_SAE_TOKENS:-1000000} --output-dir $MG/local_sae --overwrite \
      ${SAE_EXTRA:-} $EXTRA
    t sae_analysis_1 $PY sae_analysis.py --manifest $M --split train_base --sae-path $MG/local_sae \
      --base-model $MODEL --output-dir $MG/features_1 --overwrite ${SAE_FEATURE_EXTRA:-}
  fi
  if [ $PHASE != single ]; then
    t finetune_N $TORCHRUN finetune.py train --manifest $M --base-model $MODEL --output-dir $MG/adapter_N \
      --lora-dropout 0 --overwrite $EXTRA
    t eval_loss_N $TORCHRUN eval_loss.py --manifest $M --adapter-path $MG/adapter_1 --skip-base --batch-size 16 \
      --output-json $MG/eval_N.json $EXTRA
    t score_N $PY score.py --manifest $M --adapter-path $MG/adapter_1 --output-dir $MG/score_N \
      --score-mode mean --preconditioning-mode query --projection-dim 32 --subset-k $K --nproc $NPROC --overwrite $EXTRA
    t sae_analysis_N $TORCHRUN sae_analysis.py --manifest $M --split train_base --sae-path $MG/local_sae \
      --base-model $MODEL --output-dir $MG/features_N --overwrite ${SAE_FEATURE_EXTRA:-}
    $PY benchmarks/multigpu_compare.py --run-dir $MG --log "$LOG" --output-dir "$OUT" | tee -a "$LOG"
    nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null | tee -a "$LOG" || true
  fi
}

case ${BENCH:-steps} in
  steps) bench_steps ;;
  multigpu) bench_multigpu ;;
  *) echo "error: BENCH must be steps (default) or multigpu"; exit 2 ;;
esac
