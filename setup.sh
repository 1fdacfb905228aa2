#!/usr/bin/env bash
# Set up everything this project needs, then run it:
#   bash setup.sh run [main.py flags]   train (default: Pendulum-v0, 200000 actions, 150 episodes)
#   bash setup.sh test [pytest flags]   run the test suite, one worker per core (pytest-xdist), a test file per worker
# Installs clang (tinygrad's CPU compiler) with apt-get when it is missing and this is root,
# creates .venv with Python 3.11+ and installs requirements.txt into it (again only when it changed).
set -euo pipefail
cd "$(dirname "$0")"

die() { echo "setup: $*" >&2; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo "$@"; else return 1; fi; }
apt_install() { command -v apt-get >/dev/null && { as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; }; }

if ! command -v clang >/dev/null; then
  echo "setup: installing clang (tinygrad's CPU backend compiles kernels with it)"
  apt_install clang || die "tinygrad needs the clang compiler: install it (Debian/Ubuntu: sudo apt-get install clang) and run this again"
fi

python=""
for p in "${PYTHON:-}" python3.11 python3 python; do
  if [ -n "$p" ] && command -v "$p" >/dev/null && "$p" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then python=$p; break; fi
done
[ -n "$python" ] || die "Python 3.11 or newer is needed (set PYTHON=/path/to/python3.11)"

if [ ! -x .venv/bin/python ]; then
  if ! "$python" -m venv .venv 2>/dev/null; then
    rm -rf .venv
    echo "setup: installing python3-venv"
    apt_install python3-venv || die "cannot create a virtual environment: install python3-venv (sudo apt-get install python3-venv)"
    "$python" -m venv .venv
  fi
fi
if ! cmp -s requirements.txt .venv/.installed-requirements; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
  cp requirements.txt .venv/.installed-requirements
fi

case "${1:-}" in
  run)  shift; [ $# -gt 0 ] || set -- --env Pendulum-v0 --max-actions 200000 --max-episode 150
        exec .venv/bin/python main.py "$@" ;;
  test) shift; exec .venv/bin/python -m pytest -q -n auto --dist loadfile "$@" ;;
  *)    die "usage: bash setup.sh run [main.py flags] | bash setup.sh test [pytest flags]" ;;
esac
