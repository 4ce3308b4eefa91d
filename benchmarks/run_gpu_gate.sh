#!/usr/bin/env bash
# The gate (`crate verify`) on a GPU: CRATE-T, CRATE-B and CRATE-α-B/16 in bf16 autocast, eager and
# compiled, each table as JSON, then the gate's cost beside a training step at batch 256
# (python -m benchmarks.gate). Everything goes to benchmarks/results/gpu-<device>-<date>-gate*; commit it.
# Budget: on the CPU the eager gate takes 1.3 s (CRATE-T) to 13 s (CRATE-α-B/16), the float64 reference
# on the CPU being most of it; each compiled check adds its compilation (~1 min each on an H100 for the
# whole-model step, benchmarks/run_gpu.sh). Expect 5–8 minutes; each command is capped.
#
#   benchmarks/run_gpu_gate.sh            # .venv/bin/python where `make setup` made it, else python3
#   GPU_RUN_ARCHIVE=<dir>/gate.tar.gz benchmarks/run_gpu_gate.sh   # also packs what it wrote there
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
device=$($PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name().replace(' ', '-'))")
stem="benchmarks/results/gpu-${device}-$(date +%F)-gate"
{
    set +e  # a failing check must not hide the others: the file shows each one's outcome
    echo "# the gate (crate verify) on ${device}, $(date -u +%FT%TZ): torch $($PY -c 'import torch; print(torch.__version__)')"
    for model in crate_tiny_patch16_224 crate_base_patch16_224 crate_alpha_base_patch16_224; do
        for compile in "" --compile; do
            echo "## ${model} ${compile:-eager}, bf16 autocast"
            timeout 150 $PY -m crate.cli verify "$model" --device cuda --precision bf16-autocast $compile \
                --quiet --json "${stem}-${model}${compile}.json" 2>&1 | grep -vE "^W[0-9]{4} "
            echo "exit ${PIPESTATUS[0]}"
        done
    done
    timeout 300 $PY -m benchmarks.gate --device cuda --compile --models crate_tiny_patch16_224 \
        crate_base_patch16_224 crate_alpha_base_patch16_224
} 2>&1 | tee "${stem}.txt"
echo "all done in ${SECONDS} s"
if [ -n "${GPU_RUN_ARCHIVE:-}" ]; then
    tar czf "$GPU_RUN_ARCHIVE" "${stem}"* && echo "packed into ${GPU_RUN_ARCHIVE}:" "${stem}"*
fi
