#!/usr/bin/env bash
# The GPU benchmark set (batch 256, bf16 autocast) in under 8 minutes; JSON and table into
# benchmarks/results/ named with the device and the date. Run from the repository root with the
# project installed (make setup), on a machine with a CUDA GPU; commit the two files it writes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
device=$($PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name().replace(' ', '-'))")
stem="benchmarks/results/gpu-${device}-$(date +%F)"
timeout 480 $PY -m pytest -q benchmarks --bench-rounds 10 --benchmark-json="${stem}.json"
$PY -m benchmarks.report "${stem}.json" | tee "${stem}.md"
