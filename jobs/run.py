"""``ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/run.py CONFIG [--set k=v ...]``

The whole paper (``raycp run``) as a Ray job: the same arguments, output and exit codes as the
command (0 done, 2 bad input or config, 3 done with quarantined inputs, 4 storage or Ray
unreachable). The job joins the cluster it was submitted to (``RAY_ADDRESS``, set by Ray for a
job's driver) with that cluster's auth; ``data.output`` should be object storage (``s3://``,
``gs://``) or a path every node shares, so a re-submitted job resumes where the last one stopped.
"""

import sys

# torch first: a Ray job's driver that loads it late (after Ray Data's and Arrow's libraries) fails
# with "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so" (glibc's static TLS is used up)
import torch  # noqa: F401

from raycp.cli import main
from raycp.runtime import detach_from_working_dir

if __name__ == "__main__":
    detach_from_working_dir()  # Ray may re-extract the working_dir under a running driver
    sys.exit(main(["run", *sys.argv[1:]]))
