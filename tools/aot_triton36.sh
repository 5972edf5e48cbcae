#!/usr/bin/env bash
# The ahead-of-time Triton check under Triton 3.6, the release on the project's GPU machines (which have no network,
# so a kernel that needs a newer Triton must be caught here). Creates a side virtualenv with torch (CPU), numpy and
# triton 3.6 and the package installed editable without its C++ extension (the check needs none); a second run
# reuses it. Arguments go to the check, e.g. `tools/aot_triton36.sh --only sampling -v`.
#   AOT36_VENV   the virtualenv (default .venv-triton36 in the repository root)
#   PYTHON       the interpreter that creates it (default python3)
#   TORCH_SPEC   torch to install (default torch==2.13.0, a CPU build; an unpinned torch pulls GBs of CUDA packages)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${AOT36_VENV:-.venv-triton36}
PY="$VENV/bin/python"
TRITON_SPEC="triton==3.6.*"
# The editable install records pyproject.toml's package layout: redo it when that file changes.
stamp="$(sha256sum pyproject.toml | cut -d' ' -f1) $TRITON_SPEC ${TORCH_SPEC:-torch==2.13.0}"

triton36() { "$PY" -c 'import sys, triton; sys.exit(not triton.__version__.startswith("3.6."))' 2>/dev/null; }

# Never install into an environment this script did not make (say AOT36_VENV=.venv): pip would downgrade its triton.
# One made by hand for the same purpose (it has triton 3.6) is adopted.
if [ -e "$VENV" ] && [ ! -f "$VENV/.aot-venv" ]; then
  if ! triton36; then
    echo "aot-triton36: $VENV exists and is not this script's Triton 3.6 virtualenv; not touching it" \
         "(remove it, or set AOT36_VENV to another path)" >&2
    exit 2
  fi
  touch "$VENV/.aot-venv"
fi

if [ ! -f "$VENV/.aot-installed" ] || [ "$(cat "$VENV/.aot-installed")" != "$stamp" ] || ! triton36; then
  echo "aot-triton36: setting up $VENV" >&2
  if [ ! -e "$VENV" ]; then "${PYTHON:-python3}" -m venv "$VENV" && touch "$VENV/.aot-venv"; fi
  echo '*' > "$VENV/.gitignore"  # keep git status clean (Python < 3.13 venvs do not write this themselves)
  "$PY" -m pip install -q --upgrade pip "setuptools>=77" wheel
  # torch's CPU wheel does not require triton, so this pin is what the check runs with (verified below).
  # shellcheck disable=SC2086  # TORCH_SPEC may carry pip options (--index-url ...)
  "$PY" -m pip install -q ${TORCH_SPEC:-torch==2.13.0} numpy "$TRITON_SPEC"
  ELECTRA_FAST_SKIP_EXT=1 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
  if ! triton36; then
    echo "aot-triton36: $VENV has triton $("$PY" -c 'import triton; print(triton.__version__)'), not 3.6" >&2
    exit 1
  fi
  echo "$stamp" > "$VENV/.aot-installed"
fi
env -u TRITON_INTERPRET "$PY" -m electra_fast.kernels.check "$@"
