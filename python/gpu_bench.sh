#!/usr/bin/env bash
# The GPU run of the arbor_rl benchmark, in one call on the GPU machine (H200, torch + Triton
# installed there, no package index reachable). Run from the repository root:
#
#   bash python/gpu_bench.sh [extra bench flags...]
#
# It needs the carried wheels in python/dist/ (nothing is downloaded there). Prepare them on a
# machine with PyPI before the call:
#
#   (cd python && maturin build --release -o dist)      # arbor_rl: abi3 (CPython >= 3.9),
#                                                        # manylinux_2_34 x86_64
#   pip download --no-deps -d python/dist --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 safetensors       # if the GPU machine lacks it
#   # and, if `import transformers` fails there, transformers with its pure-Python deps
#   # (huggingface_hub, tokenizers, ...) the same way, pinned to test-requirements.txt.
#
# Then it installs what is missing with `pip install --no-index`, runs the 0.6B benchmark (bf16,
# FlexAttention, 8k-32k unique tokens, POR 0.5/0.75/0.85) and prints the JSON object.
set -euo pipefail
cd "$(dirname "$0")/.."
DIST=python/dist
if ! ls "$DIST"/arbor_rl-*.whl >/dev/null 2>&1; then
    echo "gpu_bench.sh: no arbor_rl wheel in $DIST (see the header of this script)" >&2
    exit 1
fi
PY=${PYTHON:-python3}
$PY -c 'import torch, sys; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), file=sys.stderr)'
$PY -m pip install --no-index --find-links "$DIST" --quiet "$DIST"/arbor_rl-*.whl
for mod in safetensors transformers; do
    if ! $PY -c "import $mod" 2>/dev/null; then
        $PY -m pip install --no-index --find-links "$DIST" --quiet "$mod"
    fi
done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >&2 || true
# Run outside the source tree so the installed package (with its compiled module) is imported.
cd /tmp
for tokens in 8192 32768; do
    $PY -m arbor_rl.bench --model 0.6b --dtype bf16 --device cuda --backend flex \
        --unique-tokens "$tokens" --budget 8192 --seq-len 2048 --samples 8 --steps 3 --json "$@"
done
