#!/usr/bin/env bash
# Stage 2: join the GGUF parts, check the sha256 and convert to a bf16 checkpoint under
# runs/models/; put the real data where the README's commands read it (../shared/data).
set -euo pipefail
test -d /tmp/site || { echo "stage 1 did not run on this machine (it went cold): run it again"; exit 3; }
cp .model_b/smollm2.gguf.part-* /tmp/parts/
cat /tmp/parts/smollm2.gguf.part-* > /tmp/parts/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p runs/models ../shared/data/chat ../shared/data/taboo
cp .model_b/alpacaeval_chat_10models.jsonl.gz ../shared/data/chat/
cp -r .model_b/taboo/. ../shared/data/taboo/
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1
python3 prepare_model.py --gguf /tmp/parts/SmolLM2-135M-Instruct.Q4_1.gguf \
  --sha256 b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 \
  --output-dir runs/models/SmolLM2-135M-Instruct --overwrite
