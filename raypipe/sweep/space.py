"""The search space of `raypipe sweep`: its config section, the trials, and what a resumed sweep must share.

`raypipe sweep` searches the repair's settings: the partition threshold ``tau``, the prune fraction,
the attribution rule, the fine-tuning route (``l_ft`` / ``f_ft`` / ``relabel``), its learning rate and its epochs
(``sweep.*``). Every list in the section is one axis; a trial takes one value of each.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from raypipe import storage
from raypipe.config import FINE_TUNE_ROUTES, RULES, Config, check_seed, check_setting, load_config
from raypipe.errors import ConfigError
from raypipe.layout import SweepLayout


@dataclass(frozen=True)
class SweepConfig:
    """`raypipe sweep`: a Ray Tune search over the partition, pruning and fine-tuning settings.

    Every list is one axis of the search space; a trial takes one value of each. The data, the
    initial model and the attributions (once per rule in `rules`) are computed once and shared.
    """

    tau: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7])
    prune_fraction: list[float] = field(default_factory=lambda: [0.0, 0.156, 0.3])
    rules: list[str] = field(default_factory=lambda: ["loss", "grad_x_act_label"])
    # Fine-tuning routes; the route's section (l_ft / f_ft / relabel) gives its other settings.
    routes: list[str] = field(default_factory=lambda: ["l_ft", "f_ft"])
    lr: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2])
    epochs: list[int] = field(default_factory=lambda: [10])
    # 0: every combination of the lists (a grid); n > 0: n distinct combinations drawn with `seed`.
    num_samples: int = 16
    seed: int = 0
    # The objective is accuracy on a validation split held out from the training data, never the test
    # split. `noisy`: the data's own validation split with its given (possibly wrong) labels: all a user
    # without clean data has. `trusted`: a small clean labelled set the user supplies in `trusted_path`.
    # `cleaned`: the validation samples the trial's own detection judged clean (their given labels).
    objective: Literal["noisy", "trusted", "cleaned"] = "noisy"
    # Parquet (file, directory or s3:// / gs:// URI): either written by raypipe (table_from_samples) or
    # in the parquet source's format (data.image_column / data.label_column).
    trusted_path: str | None = None
    # Resources of one trial (its Ray Train workers included); concurrent trials: 0 = as many as the
    # cluster's CPUs (GPUs) hold.
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    workers_per_trial: int = 1
    max_concurrent_trials: int = 0
    # ASHA early stopping: no trial is stopped before `grace_period` epochs; at each rung only the top
    # 1 / reduction_factor of the trials continue.
    grace_period: int = 1
    reduction_factor: float = 2.0

    def validate(self) -> None:
        axes: dict[str, list[Any]] = {
            "tau": self.tau,
            "prune_fraction": self.prune_fraction,
            "rules": self.rules,
            "routes": self.routes,
            "lr": self.lr,
            "epochs": self.epochs,
        }
        for name, values in axes.items():
            check_setting(len(values) >= 1, f"sweep.{name}", "needs at least one value")
            check_setting(len(set(values)) == len(values), f"sweep.{name}", "a value is listed twice")
        for v in self.tau:
            check_setting(0.0 < v <= 1.0, "sweep.tau", f"{v} is outside (0, 1]")
        for v in self.prune_fraction:
            check_setting(0.0 <= v < 1.0, "sweep.prune_fraction", f"{v} is outside [0, 1)")
        for v in self.rules:
            check_setting(v in RULES, "sweep.rules", f"unknown rule '{v}'; use any of {list(RULES)}")
        for v in self.routes:
            check_setting(
                v in FINE_TUNE_ROUTES, "sweep.routes", f"unknown route '{v}'; use any of {list(FINE_TUNE_ROUTES)}"
            )
        for v in self.lr:
            check_setting(v > 0, "sweep.lr", f"{v} must be > 0")
        for v in self.epochs:
            check_setting(v >= 1, "sweep.epochs", f"{v} must be >= 1")
        check_setting(self.num_samples >= 0, "sweep.num_samples", "must be >= 0 (0 = every combination)")
        check_seed(self.seed, "sweep.seed")
        check_setting(
            self.objective != "trusted" or self.trusted_path is not None,
            "sweep.trusted_path",
            "sweep.objective=trusted needs a clean labelled Parquet set; set sweep.trusted_path=...",
        )
        check_setting(self.cpus_per_trial > 0, "sweep.cpus_per_trial", "must be > 0 (fractions such as 0.5 work)")
        check_setting(self.gpus_per_trial >= 0, "sweep.gpus_per_trial", "must be >= 0")
        check_setting(self.workers_per_trial >= 1, "sweep.workers_per_trial", "must be >= 1")
        check_setting(
            self.max_concurrent_trials >= 0, "sweep.max_concurrent_trials", "must be >= 0 (0 = from the cluster)"
        )
        check_setting(self.grace_period >= 1, "sweep.grace_period", "must be >= 1")
        check_setting(
            self.grace_period <= max(self.epochs),
            "sweep.grace_period",
            f"{self.grace_period} is more than the most epochs a trial runs ({max(self.epochs)})",
        )
        check_setting(self.reduction_factor > 1, "sweep.reduction_factor", "must be > 1")


@dataclass(frozen=True)
class SweepJobConfig(Config):
    """A run's config plus the `sweep:` section (what `raypipe sweep` reads)."""

    sweep: SweepConfig = field(default_factory=SweepConfig)


def load_sweep_config(
    path=None, overrides: list[str] | None = None, defaults: list[str] | None = None
) -> SweepJobConfig:
    """Like `raypipe.load_config`, with the `sweep:` section (the search space, trials, objective) added."""
    return load_config(path, overrides, defaults, schema=SweepJobConfig)


@dataclass(frozen=True)
class TrialSpec:
    """The hyperparameters of one trial."""

    lr: float
    epochs: int
    route: str
    rule: str
    tau: float
    prune_fraction: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialSpec:
        return cls(
            lr=float(d["lr"]),
            epochs=int(d["epochs"]),
            route=str(d["route"]),
            rule=str(d["rule"]),
            tau=float(d["tau"]),
            prune_fraction=float(d["prune_fraction"]),
        )


# Axes of the grid, slowest-varying first (the order trials are listed and started in).
AXES = ("lr", "epochs", "route", "rule", "tau", "prune_fraction")


def trial_specs(cfg: SweepConfig) -> list[TrialSpec]:
    """Every combination of the axes (num_samples = 0 or >= their number), else num_samples distinct
    combinations drawn with cfg.seed. Grid order: `AXES`, the first varying slowest."""
    axes = [cfg.lr, cfg.epochs, cfg.routes, cfg.rules, cfg.tau, cfg.prune_fraction]
    combos = list(itertools.product(*axes))
    if 0 < cfg.num_samples < len(combos):
        pick = np.random.default_rng(cfg.seed).choice(len(combos), size=cfg.num_samples, replace=False)
        combos = [combos[i] for i in pick]
    return [TrialSpec(float(a), int(b), c, d, float(e), float(f)) for a, b, c, d, e, f in combos]


def run_config(config: Config) -> Config:
    """The run part of a sweep's config (without its `sweep:` section)."""
    return Config(**{f.name: getattr(config, f.name) for f in dataclasses.fields(Config)})


def trial_config(config: Config, spec: TrialSpec) -> Config:
    """The full raypipe config of one trial: `raypipe run` with it runs the same repair."""
    base = run_config(config)
    route_cfg = dataclasses.replace(base.section(spec.route), lr=spec.lr, epochs=spec.epochs)
    return dataclasses.replace(
        base,
        run=dataclasses.replace(base.run, routes=[spec.route]),
        attribution=dataclasses.replace(base.attribution, rule=spec.rule),
        partition=dataclasses.replace(base.partition, tau=spec.tau),
        prune=dataclasses.replace(base.prune, fraction=spec.prune_fraction),
        **{spec.route: route_cfg},
    ).validate()


# Settings that may change between an interrupted sweep and its resumption (where it runs, not what).
RESUMABLE_KEYS = (
    "ray",
    "run.executor",
    "run.device",
    "sweep.max_concurrent_trials",
    "sweep.cpus_per_trial",
    "sweep.gpus_per_trial",
    "sweep.workers_per_trial",
)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        full = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(_flatten(value, full))
        else:
            out[full] = value
    return out


def sweep_settings(config: Config) -> dict[str, Any]:
    """The flattened settings that define a sweep's trials (what a resumed sweep must share)."""
    flat = _flatten(config.to_dict())
    return {k: v for k, v in flat.items() if not any(k == r or k.startswith(r + ".") for r in RESUMABLE_KEYS)}


def check_resumable(config: Config, sweep_uri: str) -> None:
    """Refuse to resume a sweep that was started with other settings; record them on a first start."""
    lay = SweepLayout(sweep_uri)
    settings = json.loads(json.dumps(sweep_settings(config)))  # as JSON reads them back (lists, floats)
    if not storage.exists(lay.settings_file):
        storage.write_json(lay.settings_file, settings)
        return
    saved = storage.read_json(lay.settings_file)
    changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
    if changed:
        raise ConfigError(
            f"config key '{changed[0]}': the sweep in '{sweep_uri}' was started with other settings "
            f"(changed: {', '.join(changed[:6])}{', ...' if len(changed) > 6 else ''}); use another --out, "
            f"or delete '{lay.tune}' and '{lay.settings_file}' to start it again"
        )
