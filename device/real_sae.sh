#!/usr/bin/env bash
# Real run, SAE part: a TopK SAE on the base model's middle layer, per-row features of the scored
# train rows, the ridge predictor of the attribution rank, and top-k vs random by its prediction.
set -euo pipefail
source device/env.sh
if [ -d .whl_sae ] && [ "$PY" = python3 ] && [ ! -d /tmp/site/sae_lens ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_sae/*.whl
fi
t train_sae $PY train_sae.py --manifest $RUN/manifest.json --split train_base --model-name $MODEL \
  --layer $SAE_LAYER --d-sae 4096 --k 32 --tokens $SAE_TOKENS --output-dir $RUN/local_sae --overwrite ${SAE_EXTRA:-}
t sae_features $PY sae_analysis.py --manifest $RUN/manifest.json --split train_base --sae-path $RUN/local_sae \
  --model-name $MODEL --output-dir $RUN/sae_features --overwrite ${SAE_EXTRA:-}
t predictor $PY train_bidir_classifier.py --manifest $RUN/manifest.json --split train_base \
  --score-run-path $RUN/attribution --sae-dir $RUN/sae_features --output-root $RUN/sae_predictor \
  --top-k $K --write-selection $K --overwrite
SM=$RUN/sae_predictor/selection/manifest.json
for s in top_k matched_random_k; do
  t finetune_sae_$s $PY finetune.py train --manifest $SM --train-split $s \
    --resume-adapter $RUN/base_adapter --output-dir $RUN/sae_adapter_$s --overwrite $EXTRA
done
t eval_sae_top $PY eval_loss.py --manifest $SM --adapter-path $RUN/sae_adapter_top_k \
  --output-json $RUN/eval_sae_top_k.json --batch-size 16 --skip-base $EXTRA
t eval_sae_random $PY eval_loss.py --manifest $SM --adapter-path $RUN/sae_adapter_matched_random_k \
  --output-json $RUN/eval_sae_matched_random_k.json --batch-size 16 --skip-base $EXTRA
t compare_sae $PY compare_evals.py --a $RUN/eval_sae_top_k.per_example.jsonl \
  --b $RUN/eval_sae_matched_random_k.per_example.jsonl --output-json $RUN/compare_sae_top_vs_random.json
# one returned file (a call brings back at most 8)
tar czf $OUT/sae.tgz $RUN/local_sae/training_summary.json $RUN/sae_features/summary.json \
  $RUN/eval_sae_*.json $RUN/eval_sae_*.per_example.jsonl $RUN/compare_sae_top_vs_random.json \
  $RUN/sae_predictor/*.json $RUN/sae_predictor/*.png $RUN/sae_adapter_*/train_metrics.json
