"""`raypipe run` / `raypipe sweep`: log the config, build, run, clean up.

raypipe run --out runs/digits [--config jobs/configs/digits.yaml] [noise.rate=0.4 ...]
"""

from __future__ import annotations

import argparse
import sys

from raypipe.config import dump_config, load_config
from raypipe.errors import RaypipeError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raypipe", description="Repair a model trained on noisy data (RLAP).")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) the RLAP pipeline")
    run.add_argument("--out", required=True, help="run directory: a local path, s3://... or gs://...")
    run.add_argument("--config", default=None, help="YAML config file (defaults: raypipe/config.py)")
    run.add_argument("--from", dest="from_stage", default=None, help="rerun this stage and everything after it")
    run.add_argument("overrides", nargs="*", help="section.key=value settings, e.g. noise.rate=0.4")
    run.add_argument("--default", action="append", default=[], help=argparse.SUPPRESS)  # a job's own defaults
    return parser


def run_command(args: argparse.Namespace) -> int:
    from raypipe.api import run

    config = load_config(args.config, args.overrides, args.default)
    print("raypipe config:\n" + dump_config(config), flush=True)
    run(config, args.out, from_stage=args.from_stage)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return run_command(args)
    except RaypipeError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
