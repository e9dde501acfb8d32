#!/usr/bin/env bash
# What the test suite needs on top of .ci/setup.sh: the `test` extra (pytest, ruff, the tracker
# packages the tests read back) and a headless browser for the report tests (Debian's chromium
# package, installed with apt-get, as root or through sudo, when no such browser is on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup.sh
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
if ! command -v chromium chromium-browser google-chrome >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium
  else
    echo "setup-tests: no chromium on PATH and no apt-get to install it; the report tests" \
      "that open report.html in a browser will be skipped" >&2
  fi
fi
