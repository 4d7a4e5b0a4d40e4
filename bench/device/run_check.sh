#!/usr/bin/env bash
# The GPU check as the device call runs it (carry .whl when bench/device/fetch_wheels.sh filled it):
#
#     bash bench/device/run_check.sh [bench/gpu_check.py options]     # e.g. --stages 1,2
#
# Installs the carried wheels of .whl/ into a private directory (never the machine's Python:
# nothing to undo, no permission or "externally managed" refusal) and puts it on PYTHONPATH;
# then ALWAYS runs bench/gpu_check.py: a missing, empty or broken .whl/ is reported, never a
# reason to skip the check (its summary names what is still missing in missing_wheels).
# PYTHON (default python3) and OUT (default: gpu_check's own) come from the environment.
set -u
cd "$(dirname "$0")/../.." || exit 2
PY="${PYTHON:-python3}"
shopt -s nullglob
wheels=(.whl/*.whl)
if [ "${#wheels[@]}" -gt 0 ]; then
    site="${LADR_WHEEL_SITE:-${TMPDIR:-/tmp}/ladr-rt-wheels}"
    mkdir -p "$site"
    # Pure-Python wheels: pip when it is there, else unpacked as zip files (what pip would copy).
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            "${wheels[@]}"; then
        echo "run_check: installed ${#wheels[@]} carried wheel(s) into $site"
    else
        echo "run_check: pip could not install .whl/; unpacking the wheels into $site instead"
        for w in "${wheels[@]}"; do
            "$PY" -m zipfile -e "$w" "$site" || echo "run_check: could not unpack $w (the check runs without it)"
        done
    fi
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "run_check: no .whl/ here (bench/device/fetch_wheels.sh fetches it): tests that need a missing package skip"
fi
if [ -n "${OUT:-}" ]; then
    set -- --out "$OUT" "$@"
fi
PYTHONUNBUFFERED=1 exec "$PY" bench/gpu_check.py "$@"
