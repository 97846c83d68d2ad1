#!/usr/bin/env bash
# Build .venv-peer: a separate environment for the benchmark peers (llm-compressor, lm-eval).
# It pins its own transformers, so it never shares (or touches) the main .venv; every package's version
# is pinned in infra/constraints-peer.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PY:-python3.11}"
VENV="${PEER_VENV:-.venv-peer}"
if [ "$VENV" = ".venv" ]; then echo "refusing to install peers into .venv" >&2; exit 2; fi
CONSTRAIN=(-c infra/constraints-peer.txt)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
# pip itself pinned too: every version in .venv-peer is fixed (infra/constraints-peer.txt pins the rest).
"${PIP[@]}" install -q pip==26.3
# torch first, pinned, so that no later step resolves the CUDA build.
"${PIP[@]}" install -q "${CONSTRAIN[@]}" torch==2.13.0
"${PIP[@]}" install -q "${CONSTRAIN[@]}" -r infra/requirements-peer.txt
"${PIP[@]}" check
"$VENV/bin/python" -c "import torch, transformers, llmcompressor, lm_eval; print('peer env ok: torch', torch.__version__, 'transformers', transformers.__version__, 'llmcompressor', llmcompressor.__version__, 'lm_eval', lm_eval.__version__)"
