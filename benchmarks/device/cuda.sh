#!/usr/bin/env bash
# The CUDA checks, on a GPU machine that has no network (the device tool's), in one call each:
#   bash benchmarks/device/cuda.sh SET STEP...        SET: a or b (the wheels wheels.sh made)
# Steps, each under its own time cap, its output in $OUT (one log; JSON results in results.tgz):
#   tests      pytest -m cuda: bf16 training, packed = unpacked, resume, Liger and compiled layers
#              against eager, generation, the manifest's GPU memory, GRPO, vLLM (skips without
#              it); random models, no bundled files
#   attention  benchmarks/attention.py: per-sequence (FlashAttention varlen) against masked SDPA
#   qv, all    benchmarks/finetune.py on the 1.07B shape, packed, LoRA on q,v or on all seven
#              linear layers: localforge against TRL, TRL+Liger and a peft loop (set a), or
#              against Unsloth (set b; localforge runs again there to bridge the two calls)
#   options    benchmarks/finetune.py on the 1.07B shape, packed, all seven layers: localforge's
#              own kernels against kernels: liger and compile: true (set a: it carries Liger)
#   planner    benchmarks/planner.py on the 1.07B shape: predicted against held GPU memory
#   small      benchmarks/finetune.py on the 135M shape (launch-bound): localforge eager and
#              compiled, and TRL
# For example, with the device tool (carry .whl/a, then .whl/b):
#   bash benchmarks/device/cuda.sh a tests qv        (then: a options small, and b qv all)
#   bash benchmarks/device/cuda.sh b qv all
set -uo pipefail
cd "$(dirname "$0")/../.."
set_=${1:?usage: cuda.sh a|b STEP...}; shift
out=${OUT:-/tmp/cuda-out}; mkdir -p "$out/json"
log="$out/cuda-$set_.log"
site=/tmp/site-$set_
if [ ! -f "$site/.done" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        ".whl/$set_"/*.whl >>"$log" 2>&1 || { echo "cuda.sh: installing .whl/$set_ failed (see $log)"; tail -5 "$log"; exit 3; }
    touch "$site/.done"
fi
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
contenders=localforge-torch,trl,trl-liger,peft-loop
[ "$set_" = b ] && contenders=localforge-torch,unsloth
{ date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, peft, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__)"
} 2>&1 | tee -a "$log"

step() {  # step NAME SECONDS COMMAND...
    local name=$1 cap=$2; shift 2
    echo "=== $name (at most ${cap}s): $*" | tee -a "$log"
    local began=$SECONDS
    timeout --kill-after=10 "$cap" "$@" >>"$log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - began))s" | tee -a "$log"
    tail -25 "$log" | grep -v "^===" | sed "s/^/  $name| /" | tail -20
}
bench="python3 benchmarks/finetune.py --device cuda --tokenizer bpe --packing"
for s in "$@"; do
    case $s in
        tests) step tests 240 python3 -m pytest -m cuda -q -p no:cacheprovider -o addopts="-ra" \
                   tests/finetune/test_cuda.py tests/backends/test_generate.py tests/finetune/test_grpo.py \
                   tests/backends/test_vllm.py ;;
        attention) step attention 120 python3 benchmarks/attention.py --device cuda --shape llama-1b \
                       --out "$out/json/attention-$set_.json" ;;
        qv|all) step "$s" 300 $bench --shape llama-1b --targets "$s" --contenders "$contenders" \
                    --out "$out/json/finetune-$s-$set_.json" ;;
        options) step options 300 $bench --shape llama-1b --targets all \
                     --contenders localforge-torch,localforge-torch-liger,localforge-torch-compile \
                     --out "$out/json/finetune-options-$set_.json" ;;
        planner) step planner 300 python3 benchmarks/planner.py --device cuda --shape llama-1b --tokenizer bpe \
                     --out "$out/json/planner-$set_.json" ;;
        small) step small 240 $bench --shape smollm2-135m --targets qv \
                   --contenders localforge-torch,localforge-torch-compile,trl \
                   --out "$out/json/finetune-small-$set_.json" ;;
        *) echo "cuda.sh: unknown step $s (tests, attention, qv, all, options, planner, small)"; exit 2 ;;
    esac
done
tar -czf "$out/results-$set_.tgz" -C "$out" json && rm -rf "$out/json"
