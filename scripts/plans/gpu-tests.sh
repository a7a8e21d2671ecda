#!/usr/bin/env bash
# Every GPU test (`@pytest.mark.gpu`) on a lent machine. The device image lacks the dev-only packages some test
# modules import at collection (k-diffusion, resvg-py), so `pytest -m gpu tests/` stops at collection there: this
# collects only the modules that hold a GPU test. About 230 s on an H100 (12-06, twelfth session); 258 s for the 12
# tests of 12-07 (nineteenth session), the crash probe's two included; test_fsdp.py's two (237 s, twenty-first
# session) bring it to about 500 s: a 330 s limit stopped it inside them (twenty-second session). At aa13fe0
# (twenty-fourth session) the 14 tests need two 10-minute calls: the 570 s limit stopped the suite inside
# test_train_diffusion.py's test (212 s alone), so name the modules of each call:
#   scripts/plans/gpu-tests.sh [OUT [MODULE...]]      # no MODULE: every module that holds a GPU test
#   scripts/plans/gpu-tests.sh "$OUT" tests/test_train_diffusion.py tests/test_sdpa_order.py tests/test_fsdp.py
set -uo pipefail
PY=${PYTHON:-python3}
OUT=${1:-runs/gpu-tests}
mkdir -p "$OUT"
if [ $# -gt 1 ]; then
  files=("${@:2}")
else
  mapfile -t files < <(grep -l '@pytest.mark.gpu' tests/*.py)
fi
if [ "${#files[@]}" -eq 0 ]; then
  echo "no module in tests/ holds a @pytest.mark.gpu test" >&2
  exit 2
fi
echo "modules with GPU tests: ${files[*]}"
timeout -s KILL "${GPU_TESTS_LIMIT_S:-570}" $PY -m pytest -m gpu -o addopts="" -v -p no:cacheprovider "${files[@]}" \
  > "$OUT/gpu-tests.txt" 2>&1
rc=$?
tail -12 "$OUT/gpu-tests.txt"
exit $rc
