"""Ray job entrypoint: run a job spec on the cluster this job was submitted to.

    ray job submit --working-dir . -- python jobs/generate.py SPEC [--set KEY.PATH=VALUE ...]

(``imagegen submit SPEC`` sends exactly that.) The arguments are those of ``imagegen run``,
and so is the code that runs: this file has no logic of its own.
"""

import sys

from pipeline.cli import main

# A job's driver joins the cluster it was submitted to. Ray gives the driver that
# cluster's address in RAY_ADDRESS, which ray.init prefers over both an unset address and
# `auto`; `auto` is forced because the spec may name the dashboard URL it was submitted
# through (http://...), which ray.init cannot join. Outside a job, `auto` joins the Ray
# started on this machine with `ray start`. Given first, so an explicit --set still wins.
CLUSTER_RUN = ["run", "--set", "runtime.address=auto"]

if __name__ == "__main__":
    sys.exit(main([*CLUSTER_RUN, *sys.argv[1:]]))
