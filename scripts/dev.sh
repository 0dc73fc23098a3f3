#!/usr/bin/env bash
# Bootstrap and run qustream locally: `scripts/dev.sh demo` or `scripts/dev.sh test [pytest args]`.
# Installs what is missing (a .venv with the project, Redis, the default model), then runs.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${QUSTREAM_VENV:-.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

ensure_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
  fi
  local stamp="$VENV/.qustream-installed"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    # Pinned first: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 resolves to the CPU wheel here.
    "$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
    "$VENV/bin/python" -m pip install --quiet -e ".[local,dev,bench]"
    touch "$stamp"
  fi
}

redis_answers() {
  "$VENV/bin/python" - <<'PY'
import socket, sys
try:
    socket.create_connection(("127.0.0.1", 6379), timeout=1).close()
except OSError:
    sys.exit(1)
PY
}

ensure_redis() {
  redis_answers && return 0
  if ! command -v redis-server >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
    else
      echo "Redis does not answer on 127.0.0.1:6379 and redis-server is not installed." >&2
      echo "Install it (Debian: sudo apt-get install redis-server) and run again." >&2
      exit 1
    fi
  fi
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --logfile "${TMPDIR:-/tmp}/qustream-redis.log"
  for _ in $(seq 50); do redis_answers && return 0; sleep 0.1; done
  echo "redis-server did not start; see ${TMPDIR:-/tmp}/qustream-redis.log" >&2
  exit 1
}

case "${1:-}" in
  demo)
    shift
    ensure_venv
    ensure_redis
    exec "$VENV/bin/qustream" demo "$@"
    ;;
  test)
    shift
    ensure_venv
    ensure_redis
    "$VENV/bin/qustream" model prepare >/dev/null
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  *)
    echo "usage: scripts/dev.sh demo|test [args]" >&2
    exit 2
    ;;
esac
