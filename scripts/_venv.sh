# Sourced by scripts/test, scripts/demo and scripts/bench: make sure .venv exists and
# holds the project with its extras (test, dev, redis, web, multihost, detectors, hdf5,
# tiled, pyfai, epics, rabbitmq, nats); reinstall when setup.cfg changes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "Arroyo needs Python 3.11 or newer; '$PY' is $("$PY" --version 2>&1)." >&2
  exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.arroyo-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/setup.cfg" -nt "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  echo "installing Arroyo into $VENV" >&2
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test,dev,redis,web,multihost,detectors,hdf5,tiled,pyfai,epics,rabbitmq,nats]" >&2
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
