#!/usr/bin/env bash
# Run Telemetry developer entry point. On a fresh machine it provisions everything it needs:
#   scripts/dev.sh demo          provision the bundled CPU ComfyUI, run the example story, print its summary
#   scripts/dev.sh test [ARGS]   provision, lint (ruff), and run every test (ARGS go to pytest)
# Venv and ComfyUI trees are cached outside the repository (RUN_TELEMETRY_CACHE, default ~/.cache/run-telemetry).
set -euo pipefail
cd "$(dirname "$0")/.."

need_chromium() {
  if [ -x /usr/bin/chromium ]; then return 0; fi
  if [ "$(id -u)" != 0 ]; then
    echo "Debian's chromium is needed for the browser tests: apt-get install -y chromium" >&2
    return 1
  fi
  echo "+ apt-get install chromium (browser tests)"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
}

need_prometheus() {
  if [ -x /usr/bin/prometheus ]; then return 0; fi
  if [ "$(id -u)" != 0 ]; then
    echo "Debian's prometheus is needed for the metrics tests: apt-get install -y prometheus" >&2
    return 1
  fi
  echo "+ apt-get install prometheus (metrics tests; the test starts it itself, not as a service)"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
}

provision() {
  python3 harness/provision.py >/dev/null
  python3 -c 'import harness.provision as p; print(p.venv_python())'
}

cmd="${1:-}"
shift || true
case "$cmd" in
  test)
    need_chromium
    need_prometheus
    PY=$(provision)
    "$PY" -m ruff check .
    "$PY" -m ruff format --check .
    exec "$PY" -m pytest "$@"
    ;;
  demo)
    PY=$(provision)
    exec "$PY" -m harness.demo "$@"
    ;;
  bench)
    # scripts/dev.sh bench overhead|latency|routes|scale|idle|all [ARGS]: real ComfyUI, figures printed as ratios
    name="${1:-}"
    shift || true
    case "$name" in
      overhead|latency|routes|scale|idle|all) ;;
      *) echo "usage: scripts/dev.sh bench overhead|latency|routes|scale|idle|all [ARGS]" >&2; exit 2 ;;
    esac
    if [ "$name" = routes ] || [ "$name" = all ]; then
      if ! command -v wrk >/dev/null; then
        if [ "$(id -u)" != 0 ]; then echo "Debian's wrk is needed: apt-get install -y wrk" >&2; exit 1; fi
        echo "+ apt-get install wrk (routes bench)"
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
      fi
    fi
    PY=$(provision)
    exec "$PY" -m "bench.$name" "$@"
    ;;
  *)
    echo "usage: scripts/dev.sh demo | test [pytest args]" >&2
    exit 2
    ;;
esac
