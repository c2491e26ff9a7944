#!/usr/bin/env bash
# Create (or reuse) a virtual environment for `python -m benchmarks` and install the peers.
#   bash benchmarks/setup.sh [VENV]          default VENV: ./.benchvenv
# Order matters: torch first (a local CPU build where pip's configuration provides one; set
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to force the CPU wheel elsewhere), then
# numpy and psutil, then TorchOpt and higher (checked not to change torch), then Betty without its
# dependencies, because its metadata declares Python < 3.11.
set -euo pipefail
VENV="${1:-./.benchvenv}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install --upgrade pip >/dev/null
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  "$PIP" install torch==2.13.0 --index-url "$TORCH_INDEX_URL"
else
  "$PIP" install torch==2.13.0
fi
"$PIP" install numpy psutil
before="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
if "$PIP" install --dry-run torchopt==0.7.3 higher==0.2.1 2>/dev/null | grep -qi "would install.*torch-"; then
  echo "pip would change torch for torchopt/higher: installing them with --no-deps" >&2
  "$PIP" install --no-deps torchopt==0.7.3 higher==0.2.1
  "$PIP" install optree graphviz typing-extensions
else
  "$PIP" install torchopt==0.7.3 higher==0.2.1
fi
"$PIP" install --no-deps --ignore-requires-python betty-ml==0.2.1
after="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
[ "$before" = "$after" ] || { echo "torch changed from $before to $after" >&2; exit 1; }
"$VENV/bin/python" - <<'PY'
import torch, torchopt, higher, betty, numpy, psutil
from betty.problems import ImplicitProblem
print("benchmark environment ready: torch", torch.__version__, "torchopt", torchopt.__version__)
PY
echo "run: $VENV/bin/python -m benchmarks --quick   (from the repository root)"
