#!/usr/bin/env bash
# Set up a fresh GPU machine in back-to-back calls (it keeps /tmp while it stays warm between
# them); device/fetch_carry.sh filled the carried folders here first, and each stage names its own
# in the call's carry (a call carries at most 64 MiB):
#   bash device/setup.sh 1   carry .whl .model/smollm2.gguf.part-aa
#                            core wheels into /tmp/site, first GGUF part parked in /tmp/parts
#   bash device/setup.sh 2   carry .model/smollm2.gguf.part-ab .model/smollm2.gguf.part-ac .model/data
#                            the other parts joined, sha256 checked, prepare_model.py converts it to
#                            $MODEL; the real data put where the recipes read it (../shared/data)
#   bash device/setup.sh 3   carry .whl_sae
#                            sae-lens and what it imports (only the SAE recipes need it)
#   bash device/setup.sh qwen   carry .model/qwen/qwen.gguf.part-XX (one part a call, after stage 1;
#                            device/fetch_carry.sh qwen makes the nine): parks the part in
#                            /tmp/parts_qwen; once all are there, joins them (sha256 checked) and
#                            prepare_model.py converts the model to $QWEN_MODEL. Carry .model/data
#                            with one of the parts (~5 MB more) and the real data goes where the
#                            recipes read it, as stage 2 does: a Qwen-only lease needs no stage 2
set -euo pipefail
source device/env.sh
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
QWEN_SHA256=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
QWEN_BYTES=491400064
QWEN_MODEL=${QWEN_MODEL:-runs/models/Qwen2.5-Coder-0.5B-Instruct}

# the one install: carried wheels over the image's packages, nothing fetched (no network there)
install_wheels() {
  ls "$1"/*.whl >/dev/null 2>&1 || { echo "error: no wheels in $1 (carry it; device/fetch_carry.sh fills it)"; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$1"/*.whl
}
needs() { [ -e "$1" ] || { echo "error: stage $2 did not run on this machine (it went cold?): run it again"; exit 3; }; }

case ${1:-} in
  1)
    install_wheels .whl
    mkdir -p /tmp/parts && cp .model/smollm2.gguf.part-aa /tmp/parts/
    python3 -c "import torch, transformers, peft, datasets, bergson, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'datasets', datasets.__version__, torch.cuda.get_device_name())"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    ;;
  2)
    needs /tmp/parts/smollm2.gguf.part-aa 1
    cp .model/smollm2.gguf.part-* /tmp/parts/   # part-aa again too, if it is still here
    cat /tmp/parts/smollm2.gguf.part-* > /tmp/parts/SmolLM2-135M-Instruct.Q4_1.gguf
    mkdir -p ../shared/data
    cp -r .model/data/. ../shared/data/
    python3 prepare_model.py --gguf /tmp/parts/SmolLM2-135M-Instruct.Q4_1.gguf --sha256 $GGUF_SHA256 \
      --output-dir "$MODEL" --overwrite
    ;;
  3)
    needs "$MODEL/config.json" 2
    install_wheels .whl_sae
    python3 -c "
import bergson, datasets, trl, peft, transformers, gguf, sae_lens, transformer_lens, torch
from sae_lens import SAE
print('imports ok: transformers', transformers.__version__, 'peft', peft.__version__, 'sae_lens',
      sae_lens.__version__, 'torch', torch.__version__, 'GPUs', torch.cuda.device_count())"
    ;;
  qwen)
    needs /tmp/site/trl 1
    mkdir -p /tmp/parts_qwen
    cp .model/qwen/qwen.gguf.part-* /tmp/parts_qwen/ 2>/dev/null \
      || { echo "error: no .model/qwen/qwen.gguf.part-* carried (device/fetch_carry.sh qwen makes them)"; exit 2; }
    if [ -d .model/data ]; then mkdir -p ../shared/data && cp -r .model/data/. ../shared/data/; fi
    have=$(cat /tmp/parts_qwen/qwen.gguf.part-* | wc -c)
    echo "parts here: $(ls /tmp/parts_qwen | tr '\n' ' ')($have of $QWEN_BYTES bytes)"
    if [ "$have" -eq "$QWEN_BYTES" ]; then
      python3 prepare_model.py --parts /tmp/parts_qwen/qwen.gguf.part-* --sha256 $QWEN_SHA256 \
        --output-dir "$QWEN_MODEL" --overwrite
    fi
    ;;
  *) echo "usage: bash device/setup.sh 1|2|3|qwen"; exit 2;;
esac
