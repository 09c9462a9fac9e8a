#!/usr/bin/env bash
# The training stage on one GPU (≤ 5 min): Ray Train loop vs bare torch loop, samples/s and GPU use.
#
# Needs in .whl/ (git-ignored, carried): the Python wheels the GPU image lacks (ray — without its
# Java jars and dashboard client, which do not fit the transfer limit —, pydantic, jsonschema, ...)
# and site_u8.npy, the real 5-channel site as 8-bit (the image has no imagecodecs for LZW TIFFs).
# Making .whl/ here (python 3.12 wheels for the image; ray 2.60 stripped of ray/jars, ray/dashboard/client,
# ray/rllib, ray/serve and ray/llm to fit 64 MiB):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl ray==2.60.0 pydantic==2.14.4 \
#     pydantic_core==2.50.5 typing-inspection annotated-types jsonschema referencing jsonpointer rpds-py \
#     rfc3339-validator jsonschema-specifications colorful        # then rezip ray's wheel without those folders
#   python -c "import sys; sys.path.insert(0, 'tests/train'); from crops_helper import save_site_u8; \
#     save_site_u8('../shared/data/images/pediatric_5ch_BR00143976_C03_s3', '.whl/site_u8.npy')"
# Usage on the device machine:  bash benchmarks/train_gpu.sh   (JSON lines on stdout, also in $OUT)
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh"
python3 -c "import torch, ray, timm; print('torch', torch.__version__, 'ray', ray.__version__, 'timm', timm.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUTDIR/gpu.txt"
# paper recipe: B0, 128 px, batch 32 per worker, bf16 autocast + channels_last
python3 benchmarks/train.py --device cuda --site .whl/site_u8.npy --size 128 --cells 400 --batch 32 \
    --steps 60 --epochs 3 --workers 1 --cpus 16 --cpus-per-worker 8 --data-cpus 2 --val-cells 512 \
    2>"$OUTDIR/bench32.err" | tee "$OUTDIR/bench.jsonl"
# a batch that fills the GPU (same crops)
CROPS=$(ls -d /tmp/raycp-bench-train-*/crops | head -1)
python3 benchmarks/train.py --device cuda --crops "$CROPS" --batch 256 --steps 11 --epochs 4 --workers 1 \
    --cpus 16 --cpus-per-worker 8 --data-cpus 2 --val-cells 512 2>"$OUTDIR/bench256.err" | tee -a "$OUTDIR/bench.jsonl"
