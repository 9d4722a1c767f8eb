#!/usr/bin/env bash
# Device check: specroute bench engine on CUDA (bf16, the loader's only CUDA dtype).
# Prepared by benchmarks/gpu_check/prepare.sh; run from the repo root with carry [".whl", ".gpu"]; writes $OUT/log.txt and $OUT/engine_cuda.json.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{
  date -u
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi -L
  python3 -c 'import sys,torch,transformers,tokenizers,huggingface_hub,pydantic,typer; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-", "transformers", transformers.__version__, "tokenizers", tokenizers.__version__, "hub", huggingface_hub.__version__, "pydantic", pydantic.__version__, "typer", typer.__version__)'
  du -sh .gpu/world
  start=$(date +%s)
  python3 -m benchmarks.engine.cli --world .gpu/world --prompts 4 --max-new-tokens 64 --json "$OUT/engine_cuda.json"
  echo "bench rc=$? wall=$(( $(date +%s) - start ))s"
  date -u
} 2>&1 | tee "$OUT/log.txt"
