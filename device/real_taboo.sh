#!/usr/bin/env bash
# Real Taboo run: the 4 real WordGuesser episodes (clembench v2.0, llama-3.3-70b) split by target
# word into 2 train / 1 query / 1 eval, base adapter, attribution, top-1 vs random-1
# continuation, and word-guessing success of base, top and random on the eval row.
set -euo pipefail
source device/env.sh
t taboo_dataset $PY dataset.py --task taboo --run-dir $TABOO \
  --dataset-name $TABOO_DATA/clembench_runs_v2.0_llama33_70b_wordguesser_sample.jsonl \
  --instances $TABOO_DATA/instances.json --train-size 2 --query-size 1 --eval-size 1 --seed 42 --overwrite
t taboo_finetune_base $PY finetune.py train --manifest $TABOO/manifest.json --base-model $MODEL \
  --output-dir $TABOO/base_adapter --epochs 5 --overwrite $EXTRA
t taboo_score $PY score.py --manifest $TABOO/manifest.json --adapter-path $TABOO/base_adapter \
  --output-dir $TABOO/attribution --score-mode mean --preconditioning-mode query --projection-dim 32 \
  --subset-k 1 --seed 42 --overwrite $EXTRA ${SCORE_EXTRA:-}
CM=$TABOO/attribution/continuation_manifest.json
for s in top_k matched_random_k; do
  t taboo_finetune_$s $PY finetune.py train --manifest $CM --train-split $s --epochs 5 \
    --resume-adapter $TABOO/base_adapter --output-dir $TABOO/adapter_$s --overwrite $EXTRA
done
t taboo_eval_words $PY eval_words.py --manifest $CM --eval-split eval --top-adapter $TABOO/adapter_top_k \
  --random-adapter $TABOO/adapter_matched_random_k --output-json $TABOO/eval_words.json
tar czf $OUT/taboo.tgz $TABOO/manifest.json $TABOO/attribution/summary.json $TABOO/attribution/train_scores.jsonl \
  $TABOO/eval_words.json $TABOO/*/train_metrics.json
