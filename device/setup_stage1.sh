#!/usr/bin/env bash
# Stage 1 on a fresh GPU machine: install the carried wheels and park the first GGUF part
# outside the repository (the machine keeps /tmp while it stays warm between calls).
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
mkdir -p /tmp/parts && cp .model/smollm2.gguf.part-* /tmp/parts/
PYTHONPATH=/tmp/site python3 -c "import torch, transformers, peft, datasets, bergson, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'datasets', datasets.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
