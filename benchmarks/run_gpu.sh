#!/usr/bin/env bash
# The GPU set in at most 8 minutes on one H100, each part under its own time limit so that a slow one
# cannot eat the rest (the limits sum to 480 s):
#   1. the benchmarks (batch 256, bf16 autocast), eager and compiled training rows of CRATE, CRATE-α
#      and ViT, with the issue-22 goals, and the data rows (--data-pipeline cpu and gpu, end to end
#      on an ImageNet-shaped JPEG folder, the gpu pipeline between the steps and prefetched), stored
#      in the history (`make bench-compare`)                                                 241 s
#   2. the choices: the fused Triton kernel's block against SDPA and symmetric_attention, and its
#      tile sweep (benchmarks/test_attention_kernel.py), then SDPA backends at N = 197, CRATE-T's
#      compiled training step through SDPA and through the kernel, the optimizer step,
#      torch.compile's modes (benchmarks/test_compile_choices.py); written as each finishes  100 s
#   3. the profile: batch 256 against 512, GPU kernel time against wall time (launch-bound?)  50 s
#   4. the CUDA verification: both families, TF32 included; symmetric attention and every
#      SDPA backend at CRATE-T/S/B head shapes, the Triton kernel compiled, under the precision
#      rule; nvjpeg against the cpu pipeline, prefetched on a side stream; the precision tables  89 s
# Everything goes to benchmarks/results/ named with the device and the date: <stem>.json, and .md (the
# report of 1 and 2: tables, choices, goals met or missed), <stem>-choices.json, <stem>-profile.md,
# <stem>-verification.txt (and <stem>-partial.json: what finished of 1 if its limit stopped it,
# reported instead of <stem>.json); and the run of 1 to the tracked history (benchmarks/history/); commit them.
#
#   benchmarks/run_gpu.sh                  # .venv/bin/python where `make setup` made it, else python3
#   PY=python3 benchmarks/run_gpu.sh       # any Python with torch, timm, pytest, pytest-benchmark and
#                                          # hypothesis (the root conftest.py); the package need not be
#                                          # installed: the repository root goes on PYTHONPATH
#   CRATE_COMMIT=<sha> GPU_RUN_ARCHIVE=<dir>/gpu-run.tar.gz benchmarks/run_gpu.sh
#                                          # on a machine that got a copy of the tree without .git: the
#                                          # history files the run under that commit, and everything
#                                          # the run wrote is packed into one archive to bring back
#                                          # (tar xzf it in the repository root, then commit)
#
# Budget, from FLOPs and compile times. Measured 2026-11-27 (H100 80GB, torch 2.11): 137 s in all,
# pytest 112 s, of which torch.compile 43 s for two CRATE-T compiles (inference, train), base-size
# runs 26 s. 1: that set without its torch.compile option (~70 s) plus 7 compiled training steps
# (CRATE, ViT at T/S/B, CRATE-α-B/16) at ~20 s of compiling each (~140 s) and their timed rounds
# (their FLOPs ≈ the eager rows', ~1 PFLOP over 10 rounds at batch 256: ~5 s): ~215 s, and the data
# rows (a 3,072-image folder made on 16 cores ~5 s, end to end ~20 s per recipe: 3 rounds of 45
# CRATE-B steps at ~0.06 s, synthetic, synchronous and prefetched input 15 each, as the 44 of the two
# inputs before, plus start-up): ~45 s. 2: the kernel
# block (5 forms × 3 sizes × forward/train, Triton compiles ~2 s per kernel and shape): ~20 s; the tile
# sweep (16 launch shapes at CRATE-B, 13 not compiled before: ~26 s, the rule checks and timed rounds
# ~5 s): ~30 s; SDPA at three
# shapes (~0.1 TFLOP per call, 6 candidates × 16 calls: ~5 s), CRATE-T's step through the kernel
# (SDPA's compiled step in the compile cache from 1: ~10 s, the kernel's compiled ~20 s, eager with
# the kernels built by the block benchmark ~2 s), the optimizer compiled once (~20 s),
# then the modes, cheapest first: default (in the compile cache from 1: ~10 s per size), reduce-overhead
# (~25 s per size), max-autotune-no-cudagraphs (a minute or more per size: the limit may stop it; what
# finished is kept). 3: eager CRATE-T and -S at 256 and 512 (~15 s each with start-up), compiled CRATE-T
# at 256 (cached, ~20 s). 4: ~25 s measured for the earlier set, plus the SDPA backends (96 cases of
# B = 2: ~15 s), the kernel's CUDA tests (compiles per dtype and tiling: ~30 s), nvjpeg (~5 s).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import torch, timm, pytest, pytest_benchmark, hypothesis, crate" || {
    echo "$PY cannot import what the benchmarks need: torch, timm, pytest, pytest_benchmark, hypothesis, crate (this repository)" >&2
    exit 1
}
device=$($PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name().replace(' ', '-'))") || exit 1
stem="benchmarks/results/gpu-${device}-$(date +%F)"
failures=$(mktemp)  # parts that failed or hit their limit (parts inside a pipe run in a subshell)
started=$(mktemp)   # its time stamp: the history files newer than it are this run's
trap 'rm -f "$failures" "$started"' EXIT

part() {  # part NAME SECONDS COMMAND...: run it under its limit; a failure or a timeout is reported, not fatal
    local name=$1 limit=$2 start=$SECONDS status=0
    shift 2
    timeout "$limit" "$@" || status=$?
    if [ "$status" -eq 124 ]; then
        echo "$name: stopped at its ${limit} s limit" >> "$failures"
    elif [ "$status" -ne 0 ]; then
        echo "$name: exit $status" >> "$failures"
    fi
    echo "== $name: $((SECONDS - start)) s (limit ${limit} s)"
}

part benchmarks 241 $PY -m pytest -q benchmarks --ignore=benchmarks/test_compile_choices.py \
    --ignore=benchmarks/test_attention_kernel.py --bench-rounds 10 \
    --durations=12 --benchmark-json="${stem}.json" --benchmark-autosave --benchmark-storage=file://benchmarks/history \
    --results-json="${stem}-partial.json"
part choices 100 $PY -m pytest -q -s benchmarks/test_attention_kernel.py benchmarks/test_compile_choices.py \
    --bench-rounds 5 \
    --results-json="${stem}-choices.json"
reports=()
if [ -s "${stem}.json" ]; then
    reports+=("${stem}.json")
    rm -f "${stem}-partial.json"  # the same results, written as they finished
elif [ -s "${stem}-partial.json" ]; then
    reports+=("${stem}-partial.json")  # the part stopped: what finished (not in the history)
fi
[ -s "${stem}-choices.json" ] && reports+=("${stem}-choices.json")
if [ "${#reports[@]}" -gt 0 ]; then
    $PY -m benchmarks.report "${reports[@]}" | tee "${stem}.md"
fi

profile() {  # the launch-bound question: batch 256 against 512, kernel time against wall time
    {
        for model in crate_tiny_patch16_224 crate_small_patch16_224; do
            part "profile ${model}" 16 $PY -m benchmarks.profile --amp --model "$model" --batch 256 512 \
                --steps 5 --rows 12
            echo
        done
        part "profile compiled crate_tiny_patch16_224" 18 $PY -m benchmarks.profile --amp --compile \
            --model crate_tiny_patch16_224 --batch 256 --steps 5 --rows 12
    } 2>&1 | tee "${stem}-profile.md"
}
profile

{
    echo "# CUDA verification on ${device}, $(date -u +%FT%TZ): torch $($PY -c 'import torch; print(torch.__version__)')"
    part "verification: fast model, analysis" 15 env CI=1 $PY -m pytest -q -p no:cacheprovider -k cuda \
        verification/test_fast_model.py tests/test_analysis.py 2>&1 | tail -n 30
    echo "## symmetric attention and every SDPA backend under the precision rule (CRATE-T/S/B head shapes)"
    part "verification: attention" 15 env CI=1 $PY -m pytest -q -s -rs -p no:cacheprovider -k cuda \
        verification/test_symmetric_attention.py 2>&1 | grep -E "forward:|passed|failed|SKIPPED|Error|== "
    echo "## the fused Triton kernels (crate/models/mssa_kernel.py), compiled, under the precision rule"
    part "verification: Triton kernel" 35 env CI=1 $PY -m pytest -q -s -p no:cacheprovider -k cuda \
        verification/test_mssa_kernel.py 2>&1 | grep -E "forward:|passed|failed|Error|== "
    echo "## --data-pipeline gpu: nvjpeg's decoding against the cpu pipeline's, prefetched on a side stream"
    part "verification: GPU data pipeline" 10 env CI=1 $PY -m pytest -q -s -p no:cacheprovider -k cuda \
        tests/data/test_gpu_pipeline.py tests/data/test_prefetch.py 2>&1 | tail -n 15
    for family in crate alpha; do
        part "precision table ${family}" 7 $PY -m verification.precision --device cuda --family "$family"
    done
} 2>&1 | tee "${stem}-verification.txt"

echo "all done in ${SECONDS} s"
if [ -n "${GPU_RUN_ARCHIVE:-}" ]; then
    written=$({ ls -d "${stem}"*; find benchmarks/history -type f -newer "$started"; } 2>/dev/null)
    tar czf "$GPU_RUN_ARCHIVE" $written && echo "packed into ${GPU_RUN_ARCHIVE}:" $written
fi
if [ -s "$failures" ]; then
    echo "not complete:" >&2
    cat "$failures" >&2
    exit 1
fi
