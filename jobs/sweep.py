"""``ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/sweep.py lambda|subsets --run RUN [options]``

The paper's sweeps (``raycp sweep``) as a Ray job: the same arguments, output and exit codes as
the command (0 done, 2 bad input or config, 3 done with failed trials, 4 storage or Ray
unreachable). The trials run on the cluster the job was submitted to; the sweep's folder should
be object storage (``s3://``, ``gs://``) or a path every node shares, so ``--resume`` in a
re-submitted job finishes only the trials that are missing. ``subsets --asha`` needs the
cluster's dashboard (Ray Train's cleaner of stopped trials uses the State API it serves).
"""

import sys

from raycp.cli import main
from raycp.runtime import detach_from_working_dir

if __name__ == "__main__":
    detach_from_working_dir()  # Ray may re-extract the working_dir under a running driver
    sys.exit(main(["sweep", *sys.argv[1:]]))
