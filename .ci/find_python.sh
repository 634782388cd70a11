# Sourced by .ci/run and the README's commands: sets PYTHON to a Python >= 3.12 interpreter.
# Order: $PYTHON if set, then python3.12 on PATH, then pyenv's installed 3.12.x.
_is_312_or_newer() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }
_find_python() {
  if [ -n "${PYTHON:-}" ]; then
    _is_312_or_newer "$PYTHON" && { echo "$PYTHON"; return 0; }
    echo "PYTHON=$PYTHON is not a Python >= 3.12 interpreter" >&2; return 1
  fi
  if command -v python3.12 >/dev/null 2>&1 && _is_312_or_newer python3.12; then echo python3.12; return 0; fi
  if command -v pyenv >/dev/null 2>&1; then
    for candidate in "$(pyenv root)"/versions/3.1[2-9]*/bin/python; do
      [ -x "$candidate" ] && _is_312_or_newer "$candidate" && { echo "$candidate"; return 0; }
    done
  fi
  echo "No Python >= 3.12 found (jax 0.11 needs it): set PYTHON=/path/to/python3.12, or install one (e.g. pyenv install 3.12)" >&2
  return 1
}
PYTHON="$(_find_python)" || exit 1
export PYTHON
