#!/usr/bin/env bash
# Real run, part B: continue from the base adapter on top_k and matched_random_k, eval both,
# and time scoring against direct bergson and the bare forward+backward floor.
set -euo pipefail
source device/env.sh
CM=$RUN/attribution/continuation_manifest.json
for s in top_k matched_random_k; do
  t finetune_$s $PY finetune.py train --manifest $CM --train-split $s \
    --resume-adapter $RUN/base_adapter --output-dir $RUN/adapter_$s --overwrite $EXTRA
done
t eval_top $PY eval_loss.py --manifest $CM --adapter-path $RUN/adapter_top_k \
  --output-json $RUN/eval_top_k.json --batch-size 16 $EXTRA
t eval_random $PY eval_loss.py --manifest $CM --adapter-path $RUN/adapter_matched_random_k \
  --output-json $RUN/eval_matched_random_k.json --batch-size 16 --skip-base $EXTRA
t compare $PY compare_evals.py --a $RUN/eval_top_k.per_example.jsonl \
  --b $RUN/eval_matched_random_k.per_example.jsonl --output-json $RUN/compare_top_vs_random.json
t score_speed $PY benchmarks/score_speed.py --score-dir $RUN/attribution
mkdir -p $OUT/b
cp $RUN/eval_top_k.json $RUN/eval_matched_random_k.json $RUN/attribution/score_speed.json $OUT/b/
cp $RUN/adapter_top_k/train_metrics.json $OUT/b/train_metrics_top_k.json
cp $RUN/adapter_matched_random_k/train_metrics.json $OUT/b/train_metrics_random.json
tar czf $OUT/per_example_b.tgz $RUN/*.per_example.jsonl
