# Shared settings for the real runs on the GPU machine (sourced by the real_*.sh scripts).
# Every name can be overridden from the environment, which is how the chain is rehearsed on the
# CPU with the tiny test model (PY="uv run python" MODEL=... TRAIN=40 ...).
export PYTHONPATH=${PYTHONPATH:-/tmp/site} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export TQDM_MININTERVAL=20 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PY:-python3}
MODEL=${MODEL:-runs/models/SmolLM2-135M-Instruct}
RUN=${RUN:-runs/smoltalk_real}
TABOO=${TABOO:-runs/taboo_real}
CHAT_DATA=${CHAT_DATA:-../shared/data/chat/alpacaeval_chat_10models.jsonl.gz}
TABOO_DATA=${TABOO_DATA:-../shared/data/taboo}
TRAIN=${TRAIN:-4000} QUERY=${QUERY:-500} EVAL=${EVAL:-500} K=${K:-500}
SAE_LAYER=${SAE_LAYER:-15} SAE_TOKENS=${SAE_TOKENS:-4000000}
EXTRA=${EXTRA:-}   # extra flags for every script taking --max-length (the tiny model needs 256)
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
LOG=${LOG:-$OUT/log.txt}
# t NAME cmd...: run a step, print its wall-clock; the log keeps stdout+stderr of every step
t() { local name=$1; shift; local s=$(date +%s%N); echo "=== $name: $*" | tee -a $LOG
      "$@" >>$LOG 2>&1 || { echo "STEP FAILED $name"; tail -60 $LOG; exit 1; }
      echo "STEP_WALL $name $(( ($(date +%s%N) - s) / 1000000 )) ms" | tee -a $LOG; }
