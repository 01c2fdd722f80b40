#!/usr/bin/env bash
# Prepares a GPU lease on the development machine (which has a package registry) and rehearses it
# on the GPU machine's own software stack, so that the lease's minutes go to the GPU (docs/gpu.md).
#
#   bash benchmarks/prepare_lease.sh
#
# 1. A venv that mirrors the GPU machine (Python 3.12, torch 2.11.0+cu130, triton 3.6.0,
#    numpy 2.5.2), built once and cached outside the repository: $SYMILE_LEASE_VENV, default
#    ~/.cache/symile_kernels/lease-py312 (about 5 GB; the first run downloads torch).
# 2. The extensions built in that venv from a copy of this working tree: the portable CPU build
#    (no -march=native: the GPU host's CPU may differ) and the CUDA build for
#    $SYMILE_LEASE_ARCHS (default "9.0": the lent GPUs are Hopper), stripped of debug sections.
# 3. .lease/ (ignored by git): those extensions, the reference package symile 0.1.0's wheel
#    (pure Python), and the git revision.
# 4. The rehearsal: a second copy of the tree with .lease/ in it, as the device receives it, runs
#    the device's command (benchmarks/lease.sh) with --cpu-smoke in that venv; every job must pass,
#    the carried extensions must load, and the tree plus .lease/ must fit the 64 MiB carry limit.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
begin=$(date +%s)
venv=${SYMILE_LEASE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/symile_kernels/lease-py312}
archs=${SYMILE_LEASE_ARCHS:-9.0}
stack=(torch==2.11.0 triton==3.6.0 numpy==2.5.2 ninja pytest pytest-benchmark setuptools wheel)

if [ ! -x "$venv/bin/python" ]; then
    python312=$(command -v python3.12 || ls -d "$HOME"/.pyenv/versions/3.12*/bin/python 2>/dev/null | tail -1 || true)
    [ -n "$python312" ] || { echo "prepare_lease: no Python 3.12 found (pyenv install 3.12)" >&2; exit 1; }
    echo "prepare_lease: creating $venv with ${stack[*]} (once; several GB)" >&2
    mkdir -p "$(dirname "$venv")"
    "$python312" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet "${stack[@]}"
fi
"$venv/bin/python" -c "import torch, triton, numpy, sys; print('prepare_lease: venv', sys.version.split()[0], \
'torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"

copy_tree() {  # what the device receives: tracked files and untracked files git does not ignore
    mkdir -p "$1"
    git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$1"
}

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
copy_tree "$scratch/build"
echo "prepare_lease: building the extensions (CPU portable; CUDA for $archs)" >&2
build_begin=$(date +%s)
(cd "$scratch/build" && SYMILE_KERNELS_PORTABLE=1 TORCH_CUDA_ARCH_LIST="$archs" MAX_JOBS=${MAX_JOBS:-2} \
    "$venv/bin/python" setup.py -q build_ext --inplace > "$scratch/build.log" 2>&1) \
    || { tail -30 "$scratch/build.log" >&2; echo "prepare_lease: the build failed" >&2; exit 1; }
build_s=$(($(date +%s) - build_begin))

rm -rf .lease
mkdir -p .lease
for so in "$scratch"/build/symile_kernels/_cpu_kernels*.so "$scratch"/build/symile_kernels/_cuda_kernels*.so; do
    [ -e "$so" ] || { echo "prepare_lease: the build made no $(basename "$so")" >&2; exit 1; }
    strip --strip-debug -o ".lease/$(basename "$so")" "$so"
done
python3 -m pip download --quiet --no-deps --only-binary=:all: -d .lease symile==0.1.0
# The device gets the tree without .git: the suite reads the revision here.
echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . || echo '-dirty')" > .lease/git-revision.txt

echo "prepare_lease: rehearsing the device's command in the venv" >&2
copy_tree "$scratch/device"
cp -r .lease "$scratch/device/"
rehearsal=0
(cd "$scratch/device" && PATH="$venv/bin:$PATH" "$venv/bin/python" -c "
import glob, torch
for so in sorted(glob.glob('.lease/_c*_kernels*.so')):
    torch.ops.load_library(so)
    print('prepare_lease: loads without a GPU:', so)
") || rehearsal=1
(cd "$scratch/device" && PATH="$venv/bin:$PATH" PYTHON="$venv/bin/python" \
    bash benchmarks/lease.sh "$scratch/out" --cpu-smoke > "$scratch/rehearsal.log" 2>&1) || rehearsal=1
results=$(ls "$scratch"/out/*/results.jsonl 2>/dev/null | head -1)
if [ -z "$results" ] || ! "$venv/bin/python" - "$results" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
jobs = [r for r in rows if r["kind"] in ("check_job", "pytest", "build")]
bad = [r for r in jobs if r.get("status", "ok") != "ok"]
for r in bad:
    print("prepare_lease: not passed:", r.get("backend", r["kind"]), r.get("mode", ""), r["status"], file=sys.stderr)
build = next((r for r in rows if r["kind"] == "build"), {})
print("prepare_lease: the CPU extension came from", build.get("origin"), file=sys.stderr)
sys.exit(1 if bad or not jobs or ".so" not in str(build.get("origin")) else 0)
EOF
then
    rehearsal=1
    tail -40 "$scratch/rehearsal.log" >&2
fi
mkdir -p out
cp "$scratch/rehearsal.log" out/lease-rehearsal.log

tree_bytes=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- | tail -1 | cut -f1)
lease_bytes=$(du -cb .lease | tail -1 | cut -f1)
total_mib=$(( (tree_bytes + lease_bytes) / 1048576 ))
ls -l .lease
echo "prepare_lease: carried .lease/ $((lease_bytes / 1048576)) MiB + tree $((tree_bytes / 1048576)) MiB = ${total_mib} MiB (limit 64)"
echo "prepare_lease: build ${build_s} s; in all $(($(date +%s) - begin)) s; rehearsal log: out/lease-rehearsal.log"
if [ "$rehearsal" -ne 0 ] || [ "$total_mib" -gt 64 ]; then
    echo "prepare_lease: REHEARSAL FAILED"
    exit 1
fi
echo "prepare_lease: REHEARSAL PASSED"
