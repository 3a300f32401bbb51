#!/usr/bin/env bash
# issue 7's benchmark on the GPU machine, after setup_stage1/2 and with runs/smoltalk_real's
# manifest, data and base adapter in place: a small SAE for the sae_analysis row, then bench.py.
set -euo pipefail
source device/env.sh
if [ -d .whl_sae ] && [ "$PY" = python3 ] && [ ! -d /tmp/site/sae_lens ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_sae/*.whl
fi
t train_sae_small $PY train_sae.py --manifest $RUN/manifest.json --split train_base --model-name $MODEL \
  --layer $SAE_LAYER --d-sae 4096 --k 32 --tokens 1000000 --output-dir $RUN/local_sae --overwrite
t bench $PY benchmarks/bench.py --manifest $RUN/manifest.json --adapter-path $RUN/base_adapter \
  --sae-path $RUN/local_sae --rows ${BENCH_ROWS:-1000} --output-dir runs/bench
cp runs/bench/bench.json runs/bench/bench.md $OUT/
tar czf $OUT/bench_logs.tgz runs/bench/logs
