#!/usr/bin/env bash
# bench/gpu_suite.py on a GPU machine that has torch, timm and torchvision but not the other packages it imports,
# and no network: those travel as wheels in .whl/ (bench/gpu_suite.md says how to run it).
#   bash bench/gpu_suite.sh fetch            here, with PyPI: the wheels of bench/gpu_wheels.txt into .whl/
#   bash bench/gpu_suite.sh run [ARGS...]    there: install .whl/*.whl into /tmp/site, run gpu_suite.py ARGS
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  fetch)
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl -r bench/gpu_wheels.txt
    ;;
  run)
    shift
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    exec python3 bench/gpu_suite.py "$@"
    ;;
  *)
    echo "usage: bash bench/gpu_suite.sh fetch | run [bench/gpu_suite.py arguments]" >&2
    exit 2
    ;;
esac
