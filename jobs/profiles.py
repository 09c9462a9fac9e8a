"""``ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/profiles.py sweep wells.parquet --treatment-cols ...``

Profiles and the paper's evaluation (`raycp profile aggregate|evaluate|sweep|effect`; the λ sweep
is `profile sweep`) as a Ray job: the same arguments, output and exit codes as ``raycp profile``.
The job joins the cluster it was submitted to (``RAY_ADDRESS``, set by Ray for a job's driver) with
that cluster's auth; outputs should be object storage or a path every node shares.
"""

import sys

from raycp.cli import main
from raycp.runtime import detach_from_working_dir

if __name__ == "__main__":
    detach_from_working_dir()  # Ray may re-extract the working_dir under a running driver
    sys.exit(main(["profile", *sys.argv[1:]]))
