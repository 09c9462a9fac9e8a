#!/usr/bin/env bash
# Issue 17 on one GPU (≤ 8 min): the imported Cell Painting CNN's architecture profiling crops, and the
# paper's training formulations for a few hundred steps each. Not yet run on a GPU (no device lent).
#
# An imported Keras model is timm's tf_efficientnet_b0 ("same" padding computed per forward, BN eps
# 1e-3); its throughput does not depend on the weights, so a seeded random tf_efficientnet_b0 stands for
# the converted Cell_Painting_CNN_v1 here, side by side with efficientnet_b0 (raycp's training default).
# Needs .whl/ as benchmarks/train_gpu.sh describes (wheels the GPU image lacks, site_u8.npy).
# Usage on the device machine:  bash benchmarks/model_gpu.sh   (JSON lines on stdout, also in $OUT)
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh"
python3 -c "import torch, ray, timm; print('torch', torch.__version__, 'ray', ray.__version__, 'timm', timm.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUTDIR/gpu.txt"
for ARCH in tf_efficientnet_b0 efficientnet_b0; do
  python3 benchmarks/extract.py --device cuda --site .whl/site_u8.npy --input crops --sites 2000 --scale 0 \
      --cpus 16 --gpus 1 --object-store-gb 8 --batch 512 --model random --arch "$ARCH" \
      2>"$OUTDIR/extract_$ARCH.err" | tee -a "$OUTDIR/extract.jsonl"
done
# classification (the reference), then OLS, MIL (bags of 8 cells, 4 bags per step) and GRL: 3 epochs × 100 steps of 32
python3 benchmarks/train.py --device cuda --site .whl/site_u8.npy --size 128 --cells 400 --batch 32 \
    --steps 100 --epochs 3 --workers 1 --cpus 16 --cpus-per-worker 8 --data-cpus 2 --val-cells 512 \
    --formulations ols,mil,grl 2>"$OUTDIR/formulations.err" | tee "$OUTDIR/formulations.jsonl"
