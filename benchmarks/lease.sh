#!/usr/bin/env bash
# The GPU machine's one command (docs/gpu.md): installs what .lease/ carries, then runs the GPU suite.
#
#   bash benchmarks/lease.sh OUT_DIR [gpu_suite.py options]   # on the GPU machine, e.g. --budget-s 480
#   bash benchmarks/lease.sh OUT_DIR --cpu-smoke              # the rehearsal (benchmarks/prepare_lease.sh)
#
# .lease/ (benchmarks/prepare_lease.sh writes it; git ignores it) holds the reference package's
# wheel, the prebuilt and stripped extensions for the GPU machine's Python and torch, and the git
# revision. The suite writes its results into OUT_DIR/gpu-<date>-<gpu or cpu>/. Nothing is
# installed outside this tree: the wheel unpacks into .lease/site, which goes on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
out_root=${1:?usage: bash benchmarks/lease.sh OUT_DIR [gpu_suite.py options]}
shift
python=${PYTHON:-python3}
begin=$(date +%s)

if ls .lease/symile-*.whl > /dev/null 2>&1; then
    "$python" -m pip install --quiet --no-index --no-deps --target .lease/site .lease/symile-*.whl \
        || echo "lease.sh: installing the reference package failed; its rows will be skipped" >&2
    export PYTHONPATH="$PWD/.lease/site${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "lease.sh: no .lease/symile-*.whl (run benchmarks/prepare_lease.sh); the reference rows will be skipped" >&2
fi
# Prebuilt extensions: loaded when they match this Python and torch, else the suite JIT-builds (timed).
for so in .lease/_cpu_kernels*.so .lease/_cuda_kernels*.so; do
    [ -e "$so" ] && cp "$so" symile_kernels/
done

device=$("$python" -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-') if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo unknown)
out="$out_root/gpu-$(date -u +%Y-%m-%d)-$device"
mkdir -p "$out"
echo "lease.sh: $(($(date +%s) - begin)) s to set up; results in $out" >&2
"$python" benchmarks/gpu_suite.py "$out" "$@"
status=$?
echo "lease.sh: gpu_suite.py exit $status after $(($(date +%s) - begin)) s" >&2
exit $status
