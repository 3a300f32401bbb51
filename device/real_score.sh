#!/usr/bin/env bash
# Real run, scoring: attribution of the train rows against the query rows (mean, query
# preconditioning, projection 32, finetune_raw), top-k and matched random subsets.
set -euo pipefail
source device/env.sh
t score $PY score.py --manifest $RUN/manifest.json --adapter-path $RUN/base_adapter \
  --output-dir $RUN/attribution --score-mode mean --preconditioning-mode query --projection-dim 32 \
  --tokenization-mode finetune_raw --subset-k $K --seed 42 --keep-gradients --overwrite $EXTRA ${SCORE_EXTRA:-}
mkdir -p $OUT/score
cp $RUN/attribution/summary.json $OUT/score/
# what a fresh machine needs to go on from here, in parts under the 16 MB a returned file may have
tar czf - $RUN/manifest.json $RUN/data $RUN/base_adapter $RUN/attribution/train_scores.jsonl \
  $RUN/attribution/summary.json $RUN/attribution/continuation_manifest.json $RUN/attribution/data \
  | split -b 15000000 - $OUT/state_score.tgz.
