"""``ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/screen.py build --preset mini -o s3://bucket/screen``

A labelled screen of real cells (`raycp screen build`) as a Ray job: the same arguments, output and
exit codes as ``raycp screen``. The job joins the cluster it was submitted to (``RAY_ADDRESS``, set
by Ray for a job's driver) with that cluster's auth; outputs should be object storage or a path
every node shares.
"""

import sys

from raycp.cli import main
from raycp.runtime import detach_from_working_dir

if __name__ == "__main__":
    detach_from_working_dir()  # Ray may re-extract the working_dir under a running driver
    sys.exit(main(["screen", *sys.argv[1:]]))
