#!/usr/bin/env bash
# The GPU set in under 8 minutes on one H100: the benchmarks (batch 256, bf16 autocast), then the CUDA
# cases of the verification suite (both families, TF32 included; the training attention and SDPA's
# flash and memory-efficient kernels, forward and backward) and the precision tables on the GPU.
# Everything goes to benchmarks/results/ named with the device and the date: <stem>.json and .md (the
# benchmarks), <stem>-verification.txt (the CUDA test run and both precision tables), and the run to
# the tracked history (benchmarks/history/, see `make bench-compare`); commit them.
#
#   benchmarks/run_gpu.sh                  # .venv/bin/python where `make setup` made it, else python3
#   PY=python3 benchmarks/run_gpu.sh       # any Python with torch, timm, pytest, pytest-benchmark and
#                                          # hypothesis (the root conftest.py); the package need not be
#                                          # installed: the repository root goes on PYTHONPATH
#
# Budget, from FLOPs: one round of every interleaved run (3 sizes × inference/train; CRATE, its naive
# baseline, ViT, and at base CRATE-α-B/16 and its naive baseline) is ~0.8 TFLOP per image, ~200 TFLOP
# at batch 256; 12 bf16 passes (10 rounds, warm-up, memory) at an assumed 200 TFLOP/s (a quarter of
# the ~800 TFLOP/s bf16 matmul peak) take ~12 s, plus one float32 FLOP-counting pass (~5 s). The ODL
# forms at B/16 shapes add ~0.4 PFLOP (~3 s), the ISTA forms and speed options (CRATE-T) little but
# torch.compile's compilation (~1–2 min). Expect 2–4 minutes with start-up; 8 is the hard limit.
# Measured 2026-11-27 on one H100 80GB (PY=python3, torch 2.11): 137 s in all, pytest 112 s, of
# which torch.compile 43 s, the base-size runs 26 s, ODL forms 3 s.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import torch, timm, pytest, pytest_benchmark, hypothesis, crate" || {
    echo "$PY cannot import what the benchmarks need: torch, timm, pytest, pytest_benchmark, hypothesis, crate (this repository)" >&2
    exit 1
}
device=$($PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name().replace(' ', '-'))")
stem="benchmarks/results/gpu-${device}-$(date +%F)"
status=0
timeout 480 $PY -m pytest -q benchmarks --bench-rounds 10 --durations=12 --benchmark-json="${stem}.json" \
    --benchmark-autosave --benchmark-storage=file://benchmarks/history || status=$?
if [ "$status" -eq 124 ]; then
    echo "stopped at the 8-minute limit: nothing written (see the budget above)" >&2
fi
[ "$status" -eq 0 ] || exit "$status"
echo "benchmarks took ${SECONDS} s"
$PY -m benchmarks.report "${stem}.json" | tee "${stem}.md"
{
    set +e  # a failing check must not hide the others: the file shows each one's outcome
    echo "# CUDA verification on ${device}, $(date -u +%FT%TZ): torch $($PY -c 'import torch; print(torch.__version__)')"
    CI=1 timeout 150 $PY -m pytest -q -p no:cacheprovider -k cuda \
        verification/test_fast_model.py tests/test_analysis.py 2>&1 | tail -n 30
    echo "## symmetric attention and SDPA's fused kernels under the precision rule (CRATE-T shapes)"
    CI=1 timeout 90 $PY -m pytest -q -s -p no:cacheprovider -k cuda \
        verification/test_symmetric_attention.py 2>&1 | grep -E "forward:|passed|failed|Error"
    echo "## the fused Triton kernels (crate/models/mssa_kernel.py) under the precision rule, compiled"
    CI=1 timeout 120 $PY -m pytest -q -s -p no:cacheprovider -k cuda verification/test_mssa_kernel.py 2>&1 | grep -E "forward:|passed|failed|Error"
    for family in crate alpha; do
        timeout 60 $PY -m verification.precision --device cuda --family "$family"
    done
} 2>&1 | tee "${stem}-verification.txt"
echo "all done in ${SECONDS} s"
