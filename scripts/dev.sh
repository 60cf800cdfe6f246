#!/usr/bin/env bash
# Run Telemetry developer entry point. On a fresh machine it provisions everything it needs:
#   scripts/dev.sh demo [ARGS]   provision one CPU ComfyUI (only what the demo needs, each step named and timed),
#                                run the example story, print its summary (ARGS go to harness/demo.py: --version V)
#   scripts/dev.sh test [ARGS]   provision the whole matrix, lint (ruff), and run every test (ARGS go to pytest)
# Venv and ComfyUI trees are cached outside the repository (RUN_TELEMETRY_CACHE, default ~/.cache/run-telemetry).
set -euo pipefail
cd "$(dirname "$0")/.."

# need_apt BINARY PACKAGE WHY [APT OPTIONS]: install a Debian package when its binary is missing (as root; otherwise say how).
need_apt() {
  if [ -x "$1" ]; then return 0; fi
  if [ "$(id -u)" != 0 ]; then
    echo "Debian's $2 is needed for $3: apt-get install -y $2" >&2
    return 1
  fi
  echo "+ apt-get install $2 ($3)"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${@:4}" "$2" >/dev/null
}

provision() {
  python3 harness/provision.py >/dev/null
  python3 -c 'import harness.provision as p; print(p.venv_python())'
}

cmd="${1:-}"
shift || true
case "$cmd" in
  test)
    need_apt /usr/bin/chromium chromium "the browser tests"
    need_apt /usr/bin/prometheus prometheus "the metrics test (started by the test itself, not as a service)" \
      --no-install-recommends
    PY=$(provision)
    "$PY" -m ruff check .
    "$PY" -m ruff format --check .
    exec "$PY" -m pytest "$@"
    ;;
  demo)
    # Only the venv here (torch, ComfyUI's and the package's requirements: no test tools, no comfy-cli), with pip's
    # progress; the demo itself then extracts the one ComfyUI tree it runs, also named and timed.
    python3 harness/provision.py --demo --progress --venv-only >/dev/null
    PY=$(python3 -c 'import harness.provision as p; print(p.venv_python())')
    exec "$PY" -m harness.demo "$@"
    ;;
  bench)
    # scripts/dev.sh bench overhead|latency|routes|scale|idle|settle|runner|all [ARGS]: real ComfyUI, figures printed as ratios
    name="${1:-}"
    shift || true
    case "$name" in
      overhead|latency|routes|scale|idle|settle|runner|all) ;;
      *) echo "usage: scripts/dev.sh bench overhead|latency|routes|scale|idle|settle|runner|all [ARGS]" >&2; exit 2 ;;
    esac
    if [ "$name" = routes ] || [ "$name" = all ]; then
      need_apt /usr/bin/wrk wrk "the routes bench"
    fi
    PY=$(provision)
    exec "$PY" -m "bench.$name" "$@"
    ;;
  *)
    echo "usage: scripts/dev.sh demo | test [pytest args]" >&2
    exit 2
    ;;
esac
