#!/usr/bin/env bash
# Prepare the one-call GPU check (run on this machine, from the repo root, after `make world`):
#   - wheels for the device's Python 3.12 into .whl/ (transformers 4.x and what the CLI
#     imports that the device image lacks), pinned to this venv's versions;
#   - a copy of the default world in .gpu/world with its weights stored as bfloat16 (the
#     loader runs CUDA in bf16 anyway, so the models are bit-identical there), to keep what
#     travels under the device tool's 64 MiB.
# Then, with the device tool: run(command="bash benchmarks/gpu_check/run.sh",
#   carry=[".whl", ".gpu"], timeout_s=420), and give_back.
set -euo pipefail
VENV=${VENV:-.venv}
WORLD=${WORLD:-$("$VENV/bin/python" -c 'from router.bundle import default_bundle_dir; print(default_bundle_dir())')}
for path in /.whl/ /.gpu/; do
  grep -qxF "$path" .git/info/exclude || echo "$path" >> .git/info/exclude
done
version() { "$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))"; }
wheels=()
for name in transformers tokenizers huggingface_hub pydantic pydantic_core pydantic-settings \
    annotated-types typing-inspection python-dotenv typing_extensions typer; do
  wheels+=("$name==$(version "$name")")
done
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${wheels[@]}"
rm -rf .gpu/world && mkdir -p .gpu && cp -r "$WORLD" .gpu/world
rm -f .gpu/world/corpus/train.jsonl  # the engine bench reads the test split only
"$VENV/bin/python" - <<'PY'
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

for path in sorted(Path(".gpu/world").rglob("*.safetensors")):
    tensors = load_file(path)
    save_file(
        {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()},
        path,
        metadata={"format": "pt"},
    )
PY
du -sh .whl .gpu/world
