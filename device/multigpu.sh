#!/usr/bin/env bash
# issue 7's multi-GPU check, after setup_stage1/2 on a machine with NPROC GPUs (nvidia-h200-x2 or
# nvidia-h100-x2): every data-parallel step on 1 process and on NPROC processes, same data, then
# benchmarks/multigpu_compare.py's speed-up / agreement table. finetune: 1 process with
# NPROC x gradient accumulation vs NPROC processes (the same optimizer steps).
# Rehearsed on the CPU over gloo: PY="uv run python" MODEL=<tiny> TRAIN=40 ... EXTRA="--max-length 256"
# MG_PHASE=single runs only the 1-process steps (on whatever GPU CUDA_VISIBLE_DEVICES leaves, e.g.
# while the other one is busy), MG_PHASE=multi then the N-process steps and the table; the default,
# all, runs both in turn.
set -euo pipefail
source device/env.sh
NPROC=${NPROC:-2}
MG=${MG_RUN:-runs/multigpu}
TORCHRUN="$PY -m torch.distributed.run --standalone --nproc-per-node $NPROC"
M=$MG/manifest.json
PHASE=${MG_PHASE:-all}
case $PHASE in all|single|multi) ;; *) echo "MG_PHASE must be all, single or multi"; exit 2;; esac
single() { [ $PHASE != multi ]; }
multi() { [ $PHASE != single ]; }
if [ -d .whl_sae ] && [ "$PY" = python3 ] && [ ! -d /tmp/site/sae_lens ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_sae/*.whl
fi
if single; then
  t dataset $PY dataset.py --run-dir $MG --dataset-name $CHAT_DATA --group-column instruction_id \
    --train-size $TRAIN --query-size $QUERY --eval-size $EVAL --seed 42 --overwrite
  t finetune_1 $PY finetune.py train --manifest $M --base-model $MODEL --output-dir $MG/adapter_1 \
    --gradient-accumulation $NPROC --lora-dropout 0 --overwrite $EXTRA
  t eval_loss_1 $PY eval_loss.py --manifest $M --adapter-path $MG/adapter_1 --skip-base --batch-size 16 \
    --output-json $MG/eval_1.json $EXTRA
  t score_1 $PY score.py --manifest $M --adapter-path $MG/adapter_1 --output-dir $MG/score_1 \
    --score-mode mean --preconditioning-mode query --projection-dim 32 --subset-k $K --nproc 1 --overwrite $EXTRA
  t train_sae $PY train_sae.py --manifest $M --split train_base --model-name $MODEL --layer $SAE_LAYER \
    --d-sae ${MG_D_SAE:-4096} --k 32 --tokens ${MG_SAE_TOKENS:-1000000} --output-dir $MG/local_sae --overwrite \
    ${SAE_EXTRA:-} $EXTRA
  t sae_analysis_1 $PY sae_analysis.py --manifest $M --split train_base --sae-path $MG/local_sae --model-name $MODEL \
    --output-dir $MG/features_1 --overwrite ${SAE_FEATURE_EXTRA:-}
fi
if multi; then
  t finetune_N $TORCHRUN finetune.py train --manifest $M --base-model $MODEL --output-dir $MG/adapter_N \
    --lora-dropout 0 --overwrite $EXTRA
  t eval_loss_N $TORCHRUN eval_loss.py --manifest $M --adapter-path $MG/adapter_1 --skip-base --batch-size 16 \
    --output-json $MG/eval_N.json $EXTRA
  t score_N $PY score.py --manifest $M --adapter-path $MG/adapter_1 --output-dir $MG/score_N \
    --score-mode mean --preconditioning-mode query --projection-dim 32 --subset-k $K --nproc $NPROC --overwrite $EXTRA
  t sae_analysis_N $TORCHRUN sae_analysis.py --manifest $M --split train_base --sae-path $MG/local_sae --model-name $MODEL \
    --output-dir $MG/features_N --overwrite ${SAE_FEATURE_EXTRA:-}
  $PY benchmarks/multigpu_compare.py --run-dir $MG --log $LOG --output-dir $OUT | tee -a $LOG
  nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null | tee -a $LOG || true
fi
