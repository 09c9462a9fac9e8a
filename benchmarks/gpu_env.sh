# Sourced by benchmarks/*_gpu.sh on the device machine: installs the carried wheels (.whl/, see
# benchmarks/train_gpu.sh for how they are made), sets the environment, and records the GPU.
OUTDIR=${OUT:-/tmp/raycp-bench}
mkdir -p "$OUTDIR"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 RAYCP_RAY_TMPDIR=/tmp/rayt
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUTDIR/gpu.txt"
