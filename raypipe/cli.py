"""`raypipe run` / `raypipe sweep` / `raypipe config`: resolve the config, run, clean up.

raypipe run --out runs/digits [--config jobs/configs/digits.yaml] [noise.rate=0.4 ...]
raypipe sweep --out runs/digits-sweep [--config jobs/configs/digits_sweep.yaml] [sweep.num_samples=8 ...]
raypipe config [--sweep] [--config FILE.yaml] [noise.rate=0.4 ...]   (prints the resolved config, runs nothing)
raypipe --version
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys

from raypipe import __version__
from raypipe.config import dump_config, load_config
from raypipe.errors import user_error

# Exit status of a run stopped by Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130
# OS errors that are the machine's state, never a bug: one line, not a traceback, wherever they surface.
ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)

# Set by Ray's job supervisor in the environment of a submitted job's entrypoint.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raypipe", description="Repair a model trained on noisy data (RLAP).")
    parser.add_argument("--version", action="version", version=f"raypipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) the RLAP pipeline")
    run.add_argument("--out", required=True, help="run directory: a local path, s3://... or gs://...")
    run.add_argument("--config", default=None, help="YAML config file (defaults: raypipe/config/schema.py)")
    run.add_argument("--from", dest="from_stage", default=None, help="rerun this stage and everything after it")
    run.add_argument("overrides", nargs="*", help="section.key=value settings, e.g. noise.rate=0.4")
    run.add_argument("--default", action="append", default=[], help=argparse.SUPPRESS)  # a job's own defaults
    sweep = sub.add_parser("sweep", help="Ray Tune search over tau, prune fraction, rule, route, lr, epochs (resumes)")
    sweep.add_argument("--out", required=True, help="sweep directory: a local path, s3://... or gs://...")
    sweep.add_argument("--config", default=None, help="YAML config file with a `sweep:` section")
    sweep.add_argument("overrides", nargs="*", help="section.key=value settings, e.g. sweep.num_samples=8")
    sweep.add_argument("--default", action="append", default=[], help=argparse.SUPPRESS)
    config = sub.add_parser("config", help="print the resolved config (defaults, --config, overrides); runs nothing")
    config.add_argument("--config", default=None, help="YAML config file")
    config.add_argument("--sweep", action="store_true", help="resolve a sweep's config (with its `sweep:` section)")
    config.add_argument("overrides", nargs="*", help="section.key=value settings")
    config.add_argument("--default", action="append", default=[], help=argparse.SUPPRESS)
    return parser


def relative_out_in_job(out: str, environ=os.environ) -> str | None:
    """The error when a submitted Ray job (with a working_dir) is given a relative --out, else None:
    such a job runs in a temporary copy of the working dir, deleted with the cluster's session."""
    if "://" in out or os.path.isabs(out) or JOB_CONFIG_ENV not in environ:
        return None
    try:
        working_dir = json.loads(environ[JOB_CONFIG_ENV]).get("runtime_env", {}).get("working_dir")
    except (ValueError, AttributeError):
        working_dir = None
    if not working_dir:
        return None
    return (
        f"--out '{out}' is a relative path, and this Ray job runs in a temporary copy of the working dir "
        "that is deleted with the cluster's session; pass an absolute path the job's node can write to "
        "(e.g. --out $PWD/runs/NAME on a local head) or an object-store URI (--out s3://BUCKET/runs/NAME)"
    )


def run_command(args: argparse.Namespace) -> int:
    from raypipe.api import run
    from raypipe.pipeline import check_from

    check_from(args.from_stage)  # before anything is printed or written
    config = load_config(args.config, args.overrides, args.default)
    print("raypipe config:\n" + dump_config(config), flush=True)
    run(config, args.out, from_stage=args.from_stage)
    return 0


def sweep_command(args: argparse.Namespace) -> int:
    from raypipe.api import run_sweep
    from raypipe.sweep import load_sweep_config

    config = load_sweep_config(args.config, args.overrides, args.default)
    print("raypipe config:\n" + dump_config(config), flush=True)
    run_sweep(config, args.out)
    return 0


def config_command(args: argparse.Namespace) -> int:
    if args.sweep:
        from raypipe.sweep import load_sweep_config

        config = load_sweep_config(args.config, args.overrides, args.default)
    else:
        config = load_config(args.config, args.overrides, args.default)
    print(dump_config(config), end="", flush=True)
    return 0


def _error(message: str) -> None:
    print("error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)  # one line, always


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    error = relative_out_in_job(args.out) if hasattr(args, "out") else None
    if error:
        _error(error)
        return 2
    try:
        if args.command == "run":
            return run_command(args)
        if args.command == "sweep":
            return sweep_command(args)
        if args.command == "config":
            return config_command(args)
    except KeyboardInterrupt:
        _error(
            "interrupted (Ctrl-C); finished stages are kept and nothing unfinished counts as done: "
            "rerun the same command to go on"
        )
        return EXIT_INTERRUPTED
    except Exception as e:
        found = user_error(e)
        if found is not None:
            _error(str(found))
            return 2
        if isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS:
            _error(f"{os.strerror(e.errno)} ({e}); free some space or use another --out")
            return 2
        raise
    return 1


if __name__ == "__main__":
    sys.exit(main())
