#!/usr/bin/env bash
# Real run, part A: M1 splits and the base adapter.
set -euo pipefail
source device/env.sh
t dataset $PY dataset.py --run-dir $RUN --dataset-name $CHAT_DATA \
  --group-column instruction_id --train-size $TRAIN --query-size $QUERY --eval-size $EVAL --seed 42 --overwrite ${DATASET_EXTRA:-}
t finetune_base $PY finetune.py train --manifest $RUN/manifest.json --base-model $MODEL \
  --output-dir $RUN/base_adapter --overwrite $EXTRA
mkdir -p $OUT/a
cp $RUN/manifest.json $RUN/base_adapter/train_metrics.json $OUT/a/
tar czf - $RUN/manifest.json $RUN/data $RUN/base_adapter | split -b 15000000 - $OUT/state_a.tgz.
