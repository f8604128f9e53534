"""`raypipe run` / `raypipe sweep` / `raypipe config`: resolve the config, run, clean up.

raypipe run --out runs/digits [--config jobs/configs/digits.yaml] [noise.rate=0.4 ...]
raypipe sweep --out runs/digits-sweep [--config jobs/configs/digits_sweep.yaml] [sweep.num_samples=8 ...]
raypipe find-issues --out runs/x [--model model.pt] [--config FILE.yaml] [...]   (detection alone)
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


def _settings_arguments(parser: argparse.ArgumentParser, config_help: str, example: str) -> None:
    """--config FILE, section.key=value overrides and a job's own defaults (hidden): every command takes them."""
    parser.add_argument("--config", default=None, help=config_help)
    parser.add_argument("overrides", nargs="*", help=f"section.key=value settings, e.g. {example}")
    parser.add_argument("--default", action="append", default=[], help=argparse.SUPPRESS)  # a job's own defaults


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raypipe", description="Repair a model trained on noisy data (RLAP).")
    parser.add_argument("--version", action="version", version=f"raypipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    out_help = "run directory: a local path, s3://... or gs://..."
    run = sub.add_parser("run", help="run (or resume) the RLAP pipeline")
    run.add_argument("--out", required=True, help=out_help)
    run.add_argument("--from", dest="from_stage", default=None, help="rerun this stage and everything after it")
    _settings_arguments(run, "YAML config file (defaults: raypipe/config/schema.py)", "noise.rate=0.4")
    sweep = sub.add_parser("sweep", help="Ray Tune search over tau, prune fraction, rule, route, lr, epochs (resumes)")
    sweep.add_argument("--out", required=True, help="sweep directory: a local path, s3://... or gs://...")
    _settings_arguments(sweep, "YAML config file with a `sweep:` section", "sweep.num_samples=8")
    find = sub.add_parser("find-issues", help="detection alone: data, initial (or --model), attribution, partition")
    find.add_argument("--out", required=True, help=out_help)
    find.add_argument("--model", default=None, help="a raypipe model.pt to inspect instead of training one")
    _settings_arguments(find, "YAML config file", "data.source=parquet")
    config = sub.add_parser("config", help="print the resolved config (defaults, --config, overrides); runs nothing")
    config.add_argument("--sweep", action="store_true", help="resolve a sweep's config (with its `sweep:` section)")
    _settings_arguments(config, "YAML config file", "noise.rate=0.4")
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


def summary_lines(config, out: str, command: str = "run") -> list[str]:
    """A one-screen view of what a run (or sweep) will do; the whole resolved config goes to config.yaml."""
    from raypipe.data import describe_noise, injected_noise, labels_of_test_split

    data, noise, det = config.data, config.noise, config.detection
    where = f" '{data.path}'" if data.path else ""
    noise_text = describe_noise(injected_noise(noise, data.source))
    if data.source == "parquet" and noise.apply_to != "any":
        noise_text += " (your own table, as it is; noise.apply_to=any injects noise.kind)"
    model = f"model.checkpoint '{config.model.checkpoint}'" if config.model.checkpoint else "trained here"
    epochs = ", ".join(f"{r} {config.section(r).epochs}" for r in ("initial", *config.run.routes))
    lines = [
        f"raypipe {__version__} {command} -> {out} (every setting: {out.rstrip('/')}/config.yaml)",
        f"  data       {data.source}{where}, {noise_text}",
        f"  test       {labels_of_test_split(data)}",
        f"  model      {config.model.name}, initial {model}; epochs: {epochs}",
        f"  detection  signal {det.signal}, decision {det.decision}, tau {config.partition.tau:g}, "
        f"attribution {config.attribution.rule}; prune {config.prune.fraction:g} of the probe neurons",
        f"  runs on    {config.run.executor} (device {config.run.device}), seed {config.run.seed}",
    ]
    sweep = getattr(config, "sweep", None)
    if sweep is not None:
        lines.append(
            f"  sweep      {sweep.num_samples or 'every'} trials over tau {sweep.tau}, prune {sweep.prune_fraction}, "
            f"rules {sweep.rules}, routes {sweep.routes}, lr {sweep.lr}; objective {sweep.objective}"
        )
    return lines


def run_command(args: argparse.Namespace) -> int:
    from raypipe.api import run
    from raypipe.pipeline import check_from

    check_from(args.from_stage)  # before anything is printed or written
    config = load_config(args.config, args.overrides, args.default)
    print("\n".join(summary_lines(config, args.out)), flush=True)
    run(config, args.out, from_stage=args.from_stage)
    return 0


def sweep_command(args: argparse.Namespace) -> int:
    from raypipe.api import run_sweep
    from raypipe.sweep import load_sweep_config

    config = load_sweep_config(args.config, args.overrides, args.default)
    print("\n".join(summary_lines(config, args.out, "sweep")), flush=True)
    run_sweep(config, args.out)
    return 0


def find_issues_command(args: argparse.Namespace) -> int:
    from raypipe import layout
    from raypipe.api import find_label_issues
    from raypipe.layout import RunLayout

    given = [f"model.checkpoint={args.model}"] if args.model else []
    config = load_config(args.config, [*args.overrides, *given], args.default)
    print("\n".join(summary_lines(config, args.out, "find-issues")), flush=True)
    issues = find_label_issues(config, args.out)
    where = layout.label_issues_file(RunLayout(args.out).stage("partition"))
    flagged = issues[issues["is_label_issue"]]
    print(f"[find-issues] {len(flagged)} of {len(issues)} training samples flagged; every row: {where}")
    shown = ["sample_id", "label_score", "given_label", "suggested_label", "p_noisy"]
    if len(flagged):
        print("most suspect:\n" + flagged[shown].head(10).to_string(index=False), flush=True)
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
        if args.command == "find-issues":
            return find_issues_command(args)
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
