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
import json
import os
import sys

from raypipe.cli import main

# Set by Ray's job supervisor in the environment of a submitted job's entrypoint.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def _out_arg(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--out" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--out="):
            return arg.split("=", 1)[1]
    return None


def relative_out_in_job(argv: list[str], environ=os.environ) -> str | None:
    """The error line when a submitted job (with a working_dir) is given a relative --out, else None."""
    out = _out_arg(argv)
    if out is None or "://" in out or os.path.isabs(out) or JOB_CONFIG_ENV not in environ:
        return None
    try:
        working_dir = json.loads(environ[JOB_CONFIG_ENV]).get("runtime_env", {}).get("working_dir")
    except (ValueError, AttributeError):
        working_dir = None
    if not working_dir:
        return None
    return (
        f"error: --out '{out}' is a relative path, and this Ray job runs in a temporary copy of the working dir "
        "that is deleted with the cluster's session; pass an absolute path the job's node can write to "
        "(e.g. --out $PWD/runs/NAME on a local head) or an object-store URI (--out s3://BUCKET/runs/NAME)"
    )


if __name__ == "__main__":
    error = relative_out_in_job(sys.argv[1:])
    if error:
        print(error, file=sys.stderr, flush=True)
        sys.exit(2)
    sys.exit(main(["run", *sys.argv[1:], "--default", "run.executor=ray"]))
