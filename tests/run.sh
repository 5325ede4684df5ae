#!/usr/bin/env bash
# `make test`: lint, then the suites that need the lab, on a fresh lab that is torn down
# even when a test fails. Prints one closing line totalling every pytest run.
set -uo pipefail
cd "$(dirname "$0")/.."

BIN=.venv/bin
# testinfra's Ansible backend calls ansible-inventory from PATH.
export PATH="$PWD/$BIN:$PATH"
REPORTS=$(mktemp -d)
status=0

step() { printf '\n==> %s\n' "$*"; }

suite() { # suite NAME PYTEST-ARGS...
  local name=$1; shift
  step "pytest: $name"
  "$BIN/python" -m pytest -p no:cacheprovider --junitxml="$REPORTS/$name.xml" "$@" || status=1
}

teardown() {
  # A lab still coming up (interrupted during lint or the app tests) is stopped first.
  if [ -n "${lab_up:-}" ]; then kill "$lab_up" 2>/dev/null; wait "$lab_up" 2>/dev/null; fi
  step "lab down"
  "$BIN/lab" down || status=1
}

# The lab comes up (on a new machine: its image built, its mirrors filled) while lint and the
# app tests, which do not use it, run.
"$BIN/lab" down
trap teardown EXIT
LAB_UP_LOG="$REPORTS/lab-up.log"
"$BIN/lab" up >"$LAB_UP_LOG" 2>&1 &
lab_up=$!

step lint
make --no-print-directory lint || status=1

suite app tests/app

step "lab up (fresh, started before lint)"
lab_up_status=0
wait "$lab_up" || lab_up_status=$?
lab_up=""
cat "$LAB_UP_LOG"
if [ "$lab_up_status" -eq 0 ]; then
  suite lab tests/lab
  suite fleet tests/fleet --durations=40
  # The same lab grown to three Redis hosts (Sentinel), then failed over.
  suite sentinel tests/sentinel --durations=5
  # A new lab of Debian 12 machines, then its Redis host replaced by a Debian 13 one with Valkey.
  suite releases tests/releases --durations=5
else
  status=1
fi
trap - EXIT
teardown
suite teardown tests/teardown

"$BIN/python" - "$REPORTS" <<'PY'
import pathlib, sys, xml.etree.ElementTree as ET
totals = dict(tests=0, failures=0, errors=0, skipped=0)
for report in pathlib.Path(sys.argv[1]).glob("*.xml"):
    for suite in ET.parse(report).getroot().iter("testsuite"):
        for key in totals:
            totals[key] += int(suite.get(key, 0))
failed = totals["failures"] + totals["errors"]
passed = totals["tests"] - failed - totals["skipped"]
print(f"\ntotal: {passed} passed, {failed} failed, {totals['skipped']} skipped")
PY
rm -rf "$REPORTS"
exit $status
