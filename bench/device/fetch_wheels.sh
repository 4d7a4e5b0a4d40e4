#!/usr/bin/env bash
# Fetch, on a machine with the package registry, the wheels the GPU machine's image lacks, into
# .whl/ (git-ignored; carry it to the device call: bench/device/run_check.sh installs it there).
# The list and versions are bench/gpu_check.py's WHEELS (printed by --wheel-specs). Wheels for
# the device's platform (CPython 3.12, manylinux x86_64), whatever this machine runs; --no-deps:
# everything else they need is in the device image.
#
#     bench/device/fetch_wheels.sh            # PYTHON (default python3) runs pip here
set -eu
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python3}"
mapfile -t specs < <("$PY" bench/gpu_check.py --wheel-specs)
[ "${#specs[@]}" -gt 0 ] || { echo "fetch_wheels: bench/gpu_check.py --wheel-specs printed nothing" >&2; exit 1; }
mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "${specs[@]}"
du -sh .whl
