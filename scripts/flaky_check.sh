#!/usr/bin/env bash
# Run the multi-process and threading tests N times in a row (default 20); a flaky test is a broken test.
# Usage: bash scripts/flaky_check.sh [N]
set -uo pipefail
cd "$(dirname "$0")/.."
runs="${1:-20}"
passed=0
for i in $(seq 1 "$runs"); do
  if .venv/bin/python -m pytest -q -p no:cacheprovider -m "multiprocess or threads" \
       --deselect tests/multiproc/test_ddp.py::test_a_dying_rank_stops_the_others_in_bounded_time \
       --deselect tests/multiproc/test_ddp.py::test_resume_under_two_processes_and_with_a_different_count \
       --deselect tests/multiproc/test_world_size.py::test_resume_two_to_one_to_two_processes_sees_every_sample_once \
       tests > "${TMPDIR:-/tmp}/flaky_$i.log" 2>&1; then
    passed=$((passed + 1)); echo "run $i: $(tail -1 "${TMPDIR:-/tmp}/flaky_$i.log")"
  else
    echo "run $i: FAILED"; tail -30 "${TMPDIR:-/tmp}/flaky_$i.log"
  fi
done
echo "passed $passed of $runs"
[ "$passed" -eq "$runs" ]
