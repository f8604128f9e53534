# The RLAP sweep (Ray Tune over tau, prune fraction, rule, route, lr, epochs), for `ray job submit`:
#
#   RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 \
#       --runtime-env cluster/runtime_env.yaml --working-dir . -- \
#       python jobs/sweep.py --out s3://my-bucket/sweeps/digits --config jobs/configs/digits_sweep.yaml [key=value ...]
#
# Locally, from the repo root: `python jobs/sweep.py --out runs/digits-sweep --config jobs/configs/digits_sweep.yaml`.
# Rerun the same command on the same --out to resume an interrupted sweep. The shared stages (data,
# initial model, attributions) run on Ray (run.executor=ray) unless an override says run.executor=local.
# In a submitted job, --out must be absolute (or s3:// / gs://), as for jobs/rlap.py.
import sys

from raypipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:], "--default", "run.executor=ray"]))
