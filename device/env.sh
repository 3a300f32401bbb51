# Shared environment of the device scripts (sourced by setup.sh, start_recipe.sh, follow.sh,
# bench.sh). Every name can be overridden from the environment, which is how the scripts are
# rehearsed on the CPU (PY=.venv/bin/python OUT=/tmp/rehearsal/out JOB=/tmp/rehearsal/job ...).
# the carried wheels (setup.sh) live in /tmp/site; no hub on the GPU machine
export PYTHONPATH=${PYTHONPATH:-/tmp/site} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# one progress line per 20 s: tqdm's redraws would fill the logs that come back
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-20}
# NVLink multicast stays off in NCCL, PyTorch and NVSHMEM (KINDS.md: a program using it can take
# the host's shared GPUs out of service); the variables must reach every process a step starts
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PY:-python3}   # the GPU image's python3 holds its torch; one executable (run_experiment --python)
MODEL=${MODEL:-runs/models/SmolLM2-135M-Instruct}   # setup.sh 2 converts it there
CHAT_DATA=${CHAT_DATA:-../shared/data/chat/alpacaeval_chat_10models.jsonl.gz}
JOB=${JOB:-/tmp/job}   # start_recipe.sh's background job (outlives the call that starts it)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOG=${LOG:-$OUT/log.txt}
# t NAME cmd...: run a step, print its wall-clock; the log keeps stdout+stderr of every step
# (benchmarks/multigpu_compare.py reads the STEP_WALL lines)
t() { local name=$1; shift; local s=$(date +%s%N); echo "=== $name: $*" | tee -a "$LOG"
      "$@" >>"$LOG" 2>&1 || { echo "STEP FAILED $name"; tail -60 "$LOG"; exit 1; }
      echo "STEP_WALL $name $(( ($(date +%s%N) - s) / 1000000 )) ms" | tee -a "$LOG"; }
