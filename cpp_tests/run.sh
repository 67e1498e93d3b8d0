#!/usr/bin/env bash
# Configure, build and test the CMake build of the dfa_ext kernels (CMakeLists.txt) out of tree in
# build/cmake, with the torch of $PYTHON (default: .venv/bin/python of this checkout).
#
#   cpp_tests/run.sh                       # Release build + ctest
#   BUILD_TYPE=RelWithDebInfo cpp_tests/run.sh   # -O3 -g -fno-omit-frame-pointer, for profiling
#   PYTHON=/other/python cpp_tests/run.sh -DDFA_WITH_CUDA=ON   # extra args go to cmake configure
#
# Env: PYTHON, BUILD_DIR (default build/cmake), BUILD_TYPE (default Release), JOBS (default 2).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
BUILD_DIR="${BUILD_DIR:-$ROOT/build/cmake}"
BUILD_TYPE="${BUILD_TYPE:-Release}"
JOBS="${JOBS:-2}"

if ! "$PYTHON" -c 'import torch' >/dev/null 2>&1; then
  echo "run.sh: '$PYTHON' cannot import torch; create the venv (.venv) or set PYTHON" >&2
  exit 1
fi

# Ninja when there is one (the venv's pip ninja counts), else CMake's default generator.  An
# existing build dir keeps the generator it was configured with.
GENERATOR=()
if [[ ! -f "$BUILD_DIR/CMakeCache.txt" ]]; then
  if command -v ninja >/dev/null 2>&1; then
    GENERATOR=(-G Ninja)
  elif [[ -x "$(dirname "$PYTHON")/ninja" ]]; then
    GENERATOR=(-G Ninja "-DCMAKE_MAKE_PROGRAM=$(dirname "$PYTHON")/ninja")
  fi
fi

start=$(date +%s)
cmake -S "$ROOT" -B "$BUILD_DIR" "${GENERATOR[@]}" \
  "-DDFA_PYTHON=$PYTHON" "-DCMAKE_BUILD_TYPE=$BUILD_TYPE" "$@"
cmake --build "$BUILD_DIR" -j "$JOBS"
ctest --test-dir "$BUILD_DIR" --output-on-failure
echo "run.sh: configure + build + test took $(( $(date +%s) - start ))s"
