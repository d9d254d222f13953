#!/usr/bin/env bash
# Build apex's NHWC GroupNorm extension (contrib/group_norm v1, `group_norm_cuda`) for the GPU machine and pack it,
# with the few Python files that import it, into a git-ignored folder that a device run carries (a few MB).
#
# The GPU machine's image: torch 2.11.0+cu130, Python 3.12, no apex. PyPI's torch==2.11.0 manylinux wheel is that
# cu130 build, so its headers and libraries, this machine's nvcc 13.0 and pyenv's Python 3.12 headers give a
# binary that loads there. torch is not imported here (that would need its 3 GB of nvidia-* wheels): the wheel is
# unpacked and nvcc/g++ are called with the flags torch.utils.cpp_extension uses for a CUDAExtension, plus apex's
# own (setup.py: -O3 --use_fast_math --ftz=false), for sm_90 only (H100/H200).
#
# apex's source cannot come from PyPI (the `apex` there is an unrelated project): give a local checkout, e.g.
#   git clone https://github.com/NVIDIA/apex && git -C apex checkout 6424da3b4faa6c8f062da4a48c424fff3f02d42d
# group_norm.py also imports `group_norm_v2_cuda` (its Blackwell kernels, sm_100 only): the pack holds a stub of
# that name whose functions raise, so the import works and an H100/H200 runs v1.
#
# The extension is packed xz-compressed (about 80 MB raw, mostly sm_90 kernels; a device call carries 64 MiB in
# all): tests/gpu/session.sh unpacks site/*.so.xz outside the pack before anything imports apex
# (scripts/apex_pack.py does both).
#
# Usage: scripts/build_apex_group_norm.sh --apex-src DIR [--out DIR] [--jobs N] [--only NAME.cu] [--dry-run]
#                                         [--check-import PY]
#   --out DIR      the pack (default .apex_build): DIR/site goes on PYTHONPATH (tests/gpu/session.sh does it)
#   --jobs N       parallel nvcc processes (default: the number of CPUs; each .cu takes 25-50 s on one core)
#   --only F.cu    compile the op .cpp and this one .cu only, and link: proves the command lines (the .so then
#                  lacks the other kernels; it is not packed)
#   --dry-run      print the commands instead of running them
#   --check-import PY  after packing, import the unpacked extension with PY (a Python 3.12 with torch 2.11.0+cu130
#                  installed; no GPU needed): proves its symbols resolve against that torch
# Environment: PYTHON312 (default: pyenv's 3.12), TORCH_WHEEL (a local torch-2.11.0 cp312 wheel; default: pip
# download from PyPI), WORK (build folder, default ${TMPDIR:-/tmp}/sd_mlperf_apex_build), NVCC (default nvcc).
set -euo pipefail
cd "$(dirname "$0")/.."
PINNED_APEX=6424da3b4faa6c8f062da4a48c424fff3f02d42d
TORCH_VERSION=2.11.0
ARCH="-gencode=arch=compute_90,code=sm_90"
APEX_SRC="" OUT=.apex_build ONLY="" DRY=0 CHECK_PY=""
JOBS=$(nproc)
WORK=${WORK:-${TMPDIR:-/tmp}/sd_mlperf_apex_build}
NVCC=${NVCC:-nvcc}

PROG=build_apex_group_norm
# shellcheck source=slurm/lib.sh
. slurm/lib.sh  # die (exit 2), run_cmd (prints the command under DRY_RUN=1)
while [ $# -gt 0 ]; do
  case "$1" in
    --apex-src) APEX_SRC=${2:?--apex-src needs a folder}; shift ;;
    --out) OUT=${2:?--out needs a folder}; shift ;;
    --jobs) JOBS=${2:?--jobs needs a number}; shift ;;
    --only) ONLY=${2:?--only needs a .cu file name}; shift ;;
    --dry-run) DRY=1 ;;
    --check-import) CHECK_PY=${2:?--check-import needs a Python}; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
[ -n "$APEX_SRC" ] || die "--apex-src DIR is required: a checkout of https://github.com/NVIDIA/apex (PyPI has no apex)"
[ -d "$APEX_SRC" ] || die "--apex-src $APEX_SRC is not a folder: give a checkout of https://github.com/NVIDIA/apex"
APEX_SRC=$(cd "$APEX_SRC" && pwd)  # absolute: the recorded command lines must not depend on how it was typed
GN="$APEX_SRC/apex/contrib/csrc/group_norm"
[ -f "$GN/group_norm_nhwc_op.cpp" ] || die "$GN/group_norm_nhwc_op.cpp not found: --apex-src must be an apex checkout"
if commit=$(git -C "$APEX_SRC" rev-parse HEAD 2> /dev/null) && [ "$commit" != "$PINNED_APEX" ]; then
  echo "warning: apex at $commit, not the pinned $PINNED_APEX (the one this script was written against)" >&2
fi
"$NVCC" --version | grep -q "release 13.0" || die "$NVCC is not CUDA 13.0 (the GPU image's torch is cu130)"

if [ -z "${PYTHON312:-}" ]; then
  PYTHON312=$(ls -d "$(pyenv root 2> /dev/null || echo "$HOME/.pyenv")"/versions/3.12*/bin/python3.12 2> /dev/null \
              | tail -n 1 || true)
fi
[ -x "${PYTHON312:-}" ] || die "Python 3.12 not found (the GPU machine's Python): set PYTHON312 (pyenv install 3.12)"
PY_INCLUDE=$("$PYTHON312" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
EXT_SUFFIX=$("$PYTHON312" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
[ -f "$PY_INCLUDE/Python.h" ] || die "no Python.h under $PY_INCLUDE"

# -- torch 2.11.0's headers and libraries, from the wheel (not installed) ------------------------------------
mkdir -p "$WORK"
if [ -z "${TORCH_WHEEL:-}" ]; then
  TORCH_WHEEL=$(ls "$WORK"/wheels/torch-$TORCH_VERSION-cp312-*.whl 2> /dev/null | head -n 1 || true)
  if [ -z "$TORCH_WHEEL" ]; then
    "$PYTHON312" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux_2_28_x86_64 -d "$WORK/wheels" "torch==$TORCH_VERSION" >&2
    TORCH_WHEEL=$(ls "$WORK"/wheels/torch-$TORCH_VERSION-cp312-*.whl | head -n 1)
  fi
fi
TORCH="$WORK/torch-$TORCH_VERSION"
if [ ! -f "$TORCH/torch/lib/libtorch_cuda.so" ]; then
  unzip -q -o "$TORCH_WHEEL" 'torch/include/*' 'torch/lib/libc10*.so' 'torch/lib/libtorch*.so' -d "$TORCH"
fi
# ATen's CUDA headers include cuBLAS, cuSPARSE and cuSOLVER headers, which a bare nvcc toolkit may lack: take
# them from the wheels torch 2.11.0 itself depends on (cuda-toolkit==13.0.2's extras; headers only are unpacked).
CUDA_LIBS_INCLUDE="$WORK/cuda-headers/nvidia/cu13/include"
if [ ! -f "$CUDA_LIBS_INCLUDE/cusparse.h" ]; then
  platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$p")
  done
  "$PYTHON312" -m pip download --only-binary=:all: --python-version 3.12 "${platforms[@]}" -d "$WORK/cuda-wheels" \
    "cuda-toolkit[cublas,cusolver,cusparse]==13.0.2" >&2
  for whl in "$WORK"/cuda-wheels/nvidia_cu{blas,sparse,solver}-*.whl; do
    unzip -q -o "$whl" 'nvidia/cu13/include/*' -d "$WORK/cuda-headers"
  done
fi
if [ -z "${CUDA_HOME:-}" ]; then  # nvcc's toolkit (it may be a wrapper script on PATH), else /usr/local/cuda
  CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")
  [ -f "$CUDA_HOME/include/cuda_runtime_api.h" ] || CUDA_HOME=/usr/local/cuda
fi
[ -f "$CUDA_HOME/include/cuda_runtime_api.h" ] || die "no CUDA headers under $CUDA_HOME/include: set CUDA_HOME"

DEFINES=(-DTORCH_EXTENSION_NAME=group_norm_cuda -DTORCH_API_INCLUDE_EXTENSION_H -D_GLIBCXX_USE_CXX11_ABI=1)
INCLUDES=(-I"$APEX_SRC/csrc" -I"$GN" -I"$TORCH/torch/include" -I"$TORCH/torch/include/torch/csrc/api/include"
          -I"$CUDA_HOME/include" -I"$CUDA_LIBS_INCLUDE" -I"$PY_INCLUDE")
NVCC_FLAGS=("${DEFINES[@]}" "${INCLUDES[@]}" -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
            -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr
            -Xcompiler -fPIC -std=c++17 -O3 --use_fast_math --ftz=false "$ARCH")
CXX_FLAGS=("${DEFINES[@]}" "${INCLUDES[@]}" -fPIC -std=c++17 -O3)
OBJ="$WORK/obj"
mkdir -p "$OBJ"

DRY_RUN=$DRY
if [ -n "$ONLY" ]; then
  CU_FILES=("$GN/$ONLY")
  [ -f "${CU_FILES[0]}" ] || die "--only $ONLY: no such file in $GN"
else
  CU_FILES=("$GN"/*.cu)
fi
echo "compiling ${#CU_FILES[@]} .cu file(s) for sm_90 with $JOBS job(s), torch $TORCH_VERSION headers, Python $PY_INCLUDE" >&2
t0=$(date +%s)
# An object newer than its source, built with today's command lines, is kept: a rerun compiles only what is missing
# or stale. The command lines are recorded in $OBJ/COMMAND_LINES; when they change, every object is rebuilt.
command_lines=$(printf '%q ' "$NVCC" "${NVCC_FLAGS[@]}" ";" g++ "${CXX_FLAGS[@]}")
if [ "$(cat "$OBJ/COMMAND_LINES" 2> /dev/null)" != "$command_lines" ]; then
  if (( DRY )); then
    echo "(the command lines differ from the recorded ones: every object would be rebuilt)"
  else
    rm -f "$OBJ"/*.o
    printf '%s' "$command_lines" > "$OBJ/COMMAND_LINES"
  fi
fi
# Each object is written under a temporary name and renamed when complete: a killed compile leaves no object.
if [ ! "$OBJ/group_norm_nhwc_op.o" -nt "$GN/group_norm_nhwc_op.cpp" ]; then
  run_cmd g++ "${CXX_FLAGS[@]}" -c "$GN/group_norm_nhwc_op.cpp" -o "$OBJ/group_norm_nhwc_op.o.part"
  run_cmd mv "$OBJ/group_norm_nhwc_op.o.part" "$OBJ/group_norm_nhwc_op.o"
fi
export NVCC OBJ DRY
printf '%s\n' "${CU_FILES[@]}" | xargs -P "$JOBS" -I{} bash -c \
  'f={}; o="$OBJ/$(basename "$f" .cu).o"; [ "$o" -nt "$f" ] && exit 0
   if (( DRY )); then echo "$NVCC ... -c $f -o $o"; else "$NVCC" "$@" -c "$f" -o "$o.part" && mv "$o.part" "$o"; fi' \
  _ "${NVCC_FLAGS[@]}"
SO="$WORK/group_norm_cuda$EXT_SUFFIX"
OBJS=("$OBJ/group_norm_nhwc_op.o")
for f in "${CU_FILES[@]}"; do OBJS+=("$OBJ/$(basename "$f" .cu).o"); done
run_cmd g++ -shared "${OBJS[@]}" -L"$TORCH/torch/lib" -lc10 -lc10_cuda -ltorch -ltorch_cpu -ltorch_cuda -ltorch_python \
  -L"$CUDA_HOME/lib64" -lcudart -Wl,--allow-shlib-undefined -o "$SO"
echo "built $SO in $(( $(date +%s) - t0 )) s" >&2
if [ -n "$ONLY" ] || (( DRY )); then
  echo "--only/--dry-run: nothing packed" >&2
  exit 0
fi

# -- the pack: the extension (xz: ~80 MB of sm_90 kernels would not fit the 64 MiB a device call carries; the
# session unpacks it), apex's group_norm Python files, empty parents, the v2 stub --------------------------------
SITE="$OUT/site"
rm -rf "$OUT"
mkdir -p "$SITE/apex/contrib/group_norm"
echo "compressing $(du -m "$SO" | cut -f1) MB of extension with xz" >&2
"$PYTHON312" scripts/apex_pack.py compress "$SO" "$SITE/$(basename "$SO").xz"
cp "$APEX_SRC/apex/contrib/group_norm/"*.py "$SITE/apex/contrib/group_norm/"
: > "$SITE/apex/__init__.py"  # apex's own __init__ imports its other (unbuilt) extensions
: > "$SITE/apex/contrib/__init__.py"
cat > "$SITE/group_norm_v2_cuda.py" <<'EOF'
"""Stub: apex's GroupNorm v2 kernels are for sm_100 (B200) and were not built; v1 serves H100/H200."""


def __getattr__(name):
    raise RuntimeError("group_norm_v2_cuda was not built (sm_100 only); scripts/build_apex_group_norm.sh builds v1")
EOF
printf 'apex %s\ntorch %s cp312 sm_90\n' "${commit:-unknown}" "$TORCH_VERSION" > "$OUT/BUILD_INFO"
size_mb=$(du -sm "$OUT" | cut -f1)
echo "packed $OUT: ${size_mb} MB (a device call carries 64 MiB in all, .whl's 5.5 MB and the checkout included)" >&2
if (( size_mb > 50 )); then
  echo "warning: ${size_mb} MB leaves little room in the 64 MiB a device call carries" >&2
fi
if [ -n "$CHECK_PY" ]; then  # what the GPU session does first: unpack, then import against the image's torch
  check_dir=$(mktemp -d)
  trap 'rm -rf "$check_dir"' EXIT  # the unpacked 75 MB extension goes whatever the check says
  "$CHECK_PY" scripts/apex_pack.py unpack "$SITE" "$check_dir" || die "could not unpack $SITE/*.so.xz"
  "$CHECK_PY" - "$check_dir" "$SITE" <<'EOF' || die "the packed extension does not import with $CHECK_PY (see above)"
import sys
sys.path[:0] = sys.argv[1:3]  # as the session puts them on PYTHONPATH: the unpacked extension, then the pack
import torch
import group_norm_cuda
import apex.contrib.group_norm  # noqa: F401  (apex's module: registers its custom ops)
print(f"import check: group_norm_cuda {sorted(n for n in dir(group_norm_cuda) if not n.startswith('_'))} and "
      f"apex.contrib.group_norm load with torch {torch.__version__} (Python {sys.version.split()[0]})")
EOF
  rm -rf "$check_dir"
fi
