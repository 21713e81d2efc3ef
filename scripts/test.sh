#!/usr/bin/env bash
# The one test command (README, .ci/run): installs what the tests need, then runs them.
#   - Debian packages: freediameterd + extensions (a real Diameter peer) and its headers with
#     gcc and make (the mme-sim extension is built by the tests), tshark (a real dissector),
#     postgresql (a real server the observation tests start and stop themselves; its cluster
#     is not used), prometheus (its promtool checks the lab's Prometheus config and dashboard
#     queries), iptables (a half-open link: a peer whose packets are dropped), chromium and
#     chromium-driver (the web console's tests drive a real browser, headless), nghttp2-client
#     (h2load: bench/sbi.py's C HTTP/2 client, so the N5g-eir figures are the server's). Installed
#     with apt-get when missing (root, or sudo).
#   - a virtual environment in .venv with the project and its test extras.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k wire_errors`.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(freediameterd freediameter-extensions libfreediameter-dev tshark postgresql gcc make iptables
              prometheus chromium chromium-driver nghttp2-client)
missing=()
for package in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null; then
    echo "scripts/test.sh: install these (Debian names) first: ${missing[*]}" >&2; exit 1; fi
  if [ "$(id -u)" -eq 0 ]; then sudo=""; elif command -v sudo >/dev/null; then sudo="sudo"; else
    echo "scripts/test.sh: need root or sudo to install: ${missing[*]}" >&2; exit 1; fi
  echo "== installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$python" -m venv .venv
fi
echo "== installing open EIR with its test dependencies into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

echo "== running the tests"
if [ "$#" -gt 0 ]; then  # a chosen subset: just those
  exec .venv/bin/python -m pytest "$@"
fi
# Style and types first (pyproject.toml: [tool.ruff], [tool.mypy]); the import layering is a
# test (tests/test_layout.py).
echo "== ruff check eir"
.venv/bin/ruff check eir
echo "== mypy (the eir package)"
.venv/bin/mypy
# Every core runs tests (pytest-xdist); the tests that bound latency or rate run after
# them, alone (the `serial` marker, tests/conftest.py). Both parts run, whichever fails.
status=0
.venv/bin/python -m pytest -n auto -m "not serial" || status=$?
echo "== the tests that bound latency or rate, one at a time"
.venv/bin/python -m pytest -m serial || status=$?
[ "$status" -eq 0 ] || exit "$status"
# The whole suite passed: the quick benchmark prints its figures (no timed assertion), so
# that every change shows its effect on throughput and latency; it fails only if it breaks.
echo "== quick benchmark (python3 bench/run.py --quick)"
.venv/bin/python bench/run.py --quick
