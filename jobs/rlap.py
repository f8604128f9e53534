# The RLAP repair job, for `ray job submit` (runs on the cluster it is submitted to; local Ray otherwise):
#
#   RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 \
#       --runtime-env cluster/runtime_env.yaml --working-dir . -- \
#       python jobs/rlap.py --out s3://my-bucket/runs/digits --config jobs/configs/digits.yaml [key=value ...]
#
# Locally, from the repo root: `python jobs/rlap.py --out runs/digits --config jobs/configs/digits.yaml`.
# The work runs on Ray (run.executor=ray) unless an override says run.executor=local.
#
# In a submitted job, --out must be absolute (or s3:// / gs://): the job runs in Ray's temporary copy
# of the working dir on the head, so a relative run directory would vanish with it.
import sys

from raypipe.cli import main

# A relative --out in a submitted job is refused by raypipe.cli (relative_out_in_job).
if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:], "--default", "run.executor=ray"]))
