#!/usr/bin/env bash
# Stage 3 (after setup_stage1/2, same warm machine): install the carried sae-lens wheels (sae-lens,
# transformer-lens, wandb and what they import; too large to travel with stage 1) and check that
# every library the pipeline imports loads.
set -euo pipefail
test -d runs/models/SmolLM2-135M-Instruct || { echo "stage 2 did not run on this machine: run it again"; exit 3; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_sae/*.whl
PYTHONPATH=/tmp/site python3 -c "
import bergson, datasets, trl, peft, transformers, gguf, sae_lens, transformer_lens, torch
from sae_lens import SAE
print('imports ok: transformers', transformers.__version__, 'peft', peft.__version__, 'sae_lens',
      sae_lens.__version__, 'torch', torch.__version__, 'GPUs', torch.cuda.device_count())"
