#!/usr/bin/env bash
# The one prepared check for a session with a GPU (issue 20, item 6): the speed
# sections, then the test suite, each writing its output under $OUT as it
# comes (unbuffered, redirected to files rather than through a pipe).
#
#   bash benchmarks/gpu_check.sh           # speed.py's full run -> benchmarks/results/speed_gpu.md
#                                          # and results/param_level_gpu.png (copied to $OUT),
#                                          # then the whole suite with -n 8
#   bash benchmarks/gpu_check.sh --quick   # speed.py --quick -> $OUT, then the streaming tests
#                                          # (runs on CPU too: JAX_PLATFORMS=cpu)
#
# Run it from the repository root. Both parts fit one 10-minute device call:
# SPEED_TIMEOUT (default 240 s) and TESTS_TIMEOUT (default 300 s) bound them,
# and speed.py rewrites its results file after every section, so a part cut
# short keeps what it measured. WORKERS (default 8) sets pytest's -n; PYTHON
# (default python3) the interpreter; SPEED_ARGS adds options to speed.py (a
# rerun of some sections: SPEED_ARGS="--sections leaves scaling"), and TESTS
# names the test files to run instead of the whole suite.
#
# The device image has jax, flax, optax, chex, hypothesis, pytest-xdist and
# torch, not torchjd: download its wheel here (`python -m pip download
# --no-deps --only-binary=:all: -d .whl torchjd==0.18.0`, with .whl/ listed in
# .git/info/exclude) and name .whl in the call's `carry`; this script installs
# whatever .whl/ holds. The library itself is imported from the checkout.
set -uo pipefail
cd "$(dirname "$0")/.."

quick=0
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;;
    *)
      echo "usage: bash benchmarks/gpu_check.sh [--quick]" >&2
      exit 2
      ;;
  esac
done

out="${OUT:-/tmp/gpu_check}"
python="${PYTHON:-python3}"
mkdir -p "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu_check_site .whl/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2> /dev/null
  "$python" -c "import jax; print('jax', jax.__version__, jax.default_backend(), jax.devices())"
} > "$out/devices.txt" 2>&1
cat "$out/devices.txt"
backend="$("$python" -c "import jax; print(jax.default_backend())" 2> /dev/null)"
if [ "$quick" = 0 ] && [ "$backend" = cpu ]; then
  echo "The full check needs a GPU (JAX's backend is cpu); use --quick." >&2
  exit 2
fi

# 1. The speed sections.
if [ "$quick" = 1 ]; then
  speed_args=(--quick --out "$out")
else
  speed_args=(--out benchmarks/results)
fi
read -r -a extra <<< "${SPEED_ARGS:-}"
speed_args+=("${extra[@]}")
echo "== speed.py ${speed_args[*]} (up to ${SPEED_TIMEOUT:-240} s) -> $out/speed.log"
timeout "${SPEED_TIMEOUT:-240}" "$python" benchmarks/speed.py "${speed_args[@]}" \
  > "$out/speed.log" 2>&1
speed_status=$?
if [ "$quick" = 0 ]; then
  cp "benchmarks/results/speed_$backend.md" "$out/" 2> /dev/null
  cp "benchmarks/results/param_level_$backend.png" "$out/" 2> /dev/null
fi

# 2. The tests (the notebooks' test needs nbclient, which the device image lacks).
tests=()
if [ "$quick" = 1 ]; then
  tests=(tests/test_streaming.py)
fi
if [ -n "${TESTS:-}" ]; then
  read -r -a tests <<< "$TESTS"
fi
ignore=()
"$python" -c "import nbclient, nbformat" 2> /dev/null || ignore=(--ignore=tests/test_notebooks.py)
echo "== pytest -n ${WORKERS:-8} ${tests[*]} (up to ${TESTS_TIMEOUT:-300} s) -> $out/tests.log"
timeout "${TESTS_TIMEOUT:-300}" "$python" -m pytest -n "${WORKERS:-8}" -q -ra --durations=15 \
  "${ignore[@]}" "${tests[@]}" > "$out/tests.log" 2>&1
tests_status=$?

echo "== speed (exit $speed_status; 124 = cut short)"
tail -n 60 "$out/speed.log"
echo "== tests (exit $tests_status; 124 = cut short)"
tail -n 40 "$out/tests.log"
[ "$speed_status" = 0 ] && [ "$tests_status" = 0 ]
