#!/usr/bin/env bash
# The extraction stage on one GPU (≤ 5 min): cells/s end to end from crops shards, PNG and TIFF
# vs a bare forward of the same crops, GPU utilisation, and the CPU cores that feed one GPU.
#
# Needs in .whl/ (git-ignored, carried): the wheels the GPU image lacks (ray, pydantic, ...; see
# benchmarks/train_gpu.sh) and site_u8.npy, the real 5-channel site as 8-bit (the image has no
# imagecodecs for LZW TIFFs: the benchmark writes zlib TIFFs of it, ×257 to 16 bits).
# Crops sites hold the site's 38 real crops 8 times (304 cells, like a JUMP field); PNG/TIFF
# sites are the real field (38 nuclei detected per site).
# Usage on the device machine:  bash benchmarks/extract_gpu.sh   (JSON lines on stdout, also in $OUT)
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh"
nproc | tee -a "$OUTDIR/gpu.txt"
timeout 270 python3 benchmarks/extract.py --device cuda --site .whl/site_u8.npy --input crops,png,tiff \
    --sites 1000,400,200 --repeat 8 --scale 0 --cpus 16 --gpus 1 --object-store-gb 4 --batch 256 \
    --sites-per-call 8 --workdir /tmp/raycp-bench-extract 2>"$OUTDIR/extract.err" | tee "$OUTDIR/extract.jsonl"
