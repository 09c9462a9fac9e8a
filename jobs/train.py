"""``ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/train.py train.yaml``

Weakly supervised training (`raycp train`; resumes from its latest checkpoint) as a Ray job: the
same arguments, output and exit codes as ``raycp train``. The job joins the cluster it was
submitted to (``RAY_ADDRESS``, set by Ray for a job's driver) with that cluster's auth; outputs
should be object storage or a path every node shares.
"""

import sys

# torch first: a Ray job's driver that loads it late (after Ray Data's and Arrow's libraries) fails
# with "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so" (glibc's static TLS is used up)
import torch  # noqa: F401

from raycp.cli import main
from raycp.runtime import detach_from_working_dir

if __name__ == "__main__":
    detach_from_working_dir()  # Ray may re-extract the working_dir under a running driver
    sys.exit(main(["train", *sys.argv[1:]]))
