#!/usr/bin/env bash
# One GPU session's measurements (issue 11; what and why: bench/gpu_session.py), in under 8 minutes
# on one H200/H100, results rewritten after every measurement.
#
# 1. Here, once (the GPU machine has torch and transformers but not these; .whl/ is git-ignored):
#      python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#          diffusers==0.42.1 importlib_metadata==8.7.0 simpy==4.1.1
# 2. The device tool, one call:
#      run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=540)
#    Results come back as $OUT/gpu_session.json (and $OUT/gpu_session.log, $OUT/profile_*.json);
#    a run cut short still returns everything measured before the cut.
#
# On the CPU, in seconds (tests/test_gpu_session.py runs this): bash bench/gpu_session.sh --dry-run
# (results under /tmp/gpu_session_out unless OUT is set; PYTHON picks the interpreter).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu_session_out}"
python="${PYTHON:-python3}"
mkdir -p "$out"
if [ -d .whl ] && ! "$python" -c "import diffusers, simpy" 2>/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# the parts' budgets add up to 6m45s; past 7m50s everything stops, what was measured stays
timeout --signal=INT --kill-after=10 470 "$python" bench/gpu_session.py --out "$out" "$@" 2>&1 | tee "$out/gpu_session.log"
