"""The sweep's shared stages, its validation set, and one trial: plain Python over URIs, no Ray.

The shared stages are the pipeline's own (`raypipe.pipeline.STAGES`), computed once under
``<sweep>/base`` (data, initial model) and once per rule (attribution). A trial is the same stage
table from the partition on, with the trial's config, under its own folder whose upstream stages are
those shared folders (`raypipe.layout.SweepLayout.trial`): a rerun skips what is done, a restarted
trial resumes its fine-tuning from the route's ``checkpoint.pt``. Ray Tune's wrapper is
`raypipe.distributed.tune`.

The objective is the accuracy on a validation split held out from the training data, after the
trial's last epoch (never the best epoch, never the test split). ``sweep.objective`` picks which:

- ``noisy``: the data stage's validation split with its *given* labels, corrupted at the same rate as
  the training labels: all that a user without clean data has. Under symmetric label noise, accuracy
  on noisy labels is an increasing function of the true accuracy (for rates below (C - 1) / C), so it
  ranks trials correctly, only compressed; under class-dependent noise it can mislead;
- ``trusted``: a small clean labelled set the user supplies (``sweep.trusted_path``, Parquet: written
  by raypipe's ``table_from_samples`` or in the parquet source's image / label format);
- ``cleaned``: the validation samples the trial's own detection judged clean (the partition carries its
  decision over to the validation split: `raypipe.stages.validation`), with their given labels: no clean
  data needed, and far fewer wrong labels than ``noisy`` under class-dependent noise.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow.dataset as pads

from raypipe import layout, storage
from raypipe.config import Config, dump_config
from raypipe.data import SampleSet, samples_from_table, table_from_samples
from raypipe.data.parquet_source import read_parquet_source
from raypipe.errors import ConfigError, DataError, RaypipeError, TrainingDiverged
from raypipe.layout import RunLayout, SweepLayout
from raypipe.pipeline import Run
from raypipe.stages import Executor
from raypipe.stages.train import finished_state
from raypipe.sweep.space import TrialSpec, run_config, trial_config
from raypipe.training.checkpoint import read_training

METRIC = "val_accuracy"


def prepare_base(config: Config, sweep_uri: str, executor: Executor, log=print) -> dict[str, Any]:
    """The data, the initial model and one attribution per rule in sweep.rules, each once, and the
    validation set. Returns {"data": summary, "attribution": {rule: manifest}, "ran": [stages computed now]}."""
    lay = SweepLayout(sweep_uri)
    storage.makedirs(sweep_uri)
    storage.write_bytes(lay.config_file, dump_config(config).encode())
    cfg = run_config(config)
    base = Run(cfg, lay.base, executor, log).run(["data", "initial"])
    ran = [f"base/{s}" for s in base.ran]
    attributions = {}
    for rule in config.sweep.rules:
        rule_cfg = dataclasses.replace(cfg, attribution=dataclasses.replace(cfg.attribution, rule=rule))
        r = Run(rule_cfg, lay.rule(rule), executor, log).run(["attribution"])
        attributions[rule] = r.manifest("attribution")
        ran += [f"base/{rule}/{s}" for s in r.ran]
    write_validation_set(config, sweep_uri)
    return {"data": base.summary("data"), "attribution": attributions, "ran": ran}


# ---------------------------------------------------------------------------------------------
# The validation set (the objective).


def read_trusted(path: str, config: Config, sample_shape: tuple[int, ...], num_classes: int) -> SampleSet:
    """The user's clean labelled set (sweep.trusted_path) as a SampleSet shaped like the data."""
    where = f"config key 'sweep.trusted_path': '{path}'"
    if not storage.exists(path):
        raise ConfigError(f"{where} does not exist; point it at a Parquet file or directory of clean samples")
    fs, inner = storage.resolve(path)
    try:
        names = pads.dataset(inner, filesystem=fs, format="parquet").schema.names
    except Exception as e:  # pyarrow raises several types for unreadable data
        raise DataError(f"{where} is not readable Parquet: {str(e).splitlines()[0]}") from None
    image = config.data.image_column if config.data.image_column in names else "x"  # raypipe's own tables: x
    data_cfg = dataclasses.replace(
        config.data,
        source="parquet",
        path=path,
        image_column=image,
        shape=None,
        num_classes=num_classes,
        test_path=None,
        test_label_column=None,
        true_label_column=None,
    )
    try:
        samples, _, _ = read_parquet_source(data_cfg)
    except RaypipeError as e:
        raise DataError(f"{where}: {e}") from None
    width = int(np.prod(sample_shape))
    found = samples.x.reshape(len(samples), -1).shape[1]
    if found != width:
        raise DataError(
            f"{where}: each sample has {found} values, the data's samples {width} (shape {list(sample_shape)})"
        )
    if samples.label.min() < 0 or samples.label.max() >= num_classes:
        raise DataError(
            f"{where}: labels must be in [0, {num_classes}); found {samples.label.min()}..{samples.label.max()}"
        )
    x = samples.x.reshape(len(samples), *sample_shape)
    return SampleSet.clean(samples.sample_id, x, samples.label, num_classes)


def validation_uri(config: Config, sweep_uri: str, trial: RunLayout | None = None) -> str:
    """Where a trial's validation set is: the data stage's val split (noisy), the converted trusted set, or (cleaned)
    the val samples the trial's own partition detected as clean."""
    lay = SweepLayout(sweep_uri)
    if config.sweep.objective == "trusted":
        return lay.validation
    if config.sweep.objective == "cleaned" and trial is not None:
        return layout.cleaned_val_file(trial.stage("partition"))
    return layout.split_file(lay.base.stage("data"), "val")


def write_validation_set(config: Config, sweep_uri: str) -> None:
    """Check the validation set once (not in every trial); write a trusted set in raypipe's table format."""
    lay = SweepLayout(sweep_uri)
    data_uri = lay.base.stage("data")
    if config.sweep.objective == "trusted":
        data = storage.read_manifest(data_uri)["summary"]
        val = read_trusted(config.sweep.trusted_path, config, tuple(data["sample_shape"]), data["num_classes"])
        storage.write_table(lay.validation, table_from_samples(val))
    elif storage.read_manifest(data_uri)["summary"]["rows"]["val"] == 0:
        raise ConfigError(
            f"config key 'data.val_fraction': sweep.objective={config.sweep.objective} needs a validation split "
            "held out from the "
            "training data; set data.val_fraction > 0 (e.g. 0.1) or use sweep.objective=trusted"
        )


def validation_set(config: Config, sweep_uri: str, trial: RunLayout | None = None) -> SampleSet:
    return samples_from_table(storage.read_table(validation_uri(config, sweep_uri, trial)))


# ---------------------------------------------------------------------------------------------
# One trial.


def trial_history(sweep_uri: str, trial_id: str, spec: TrialSpec) -> list[dict[str, Any]]:
    """The finished epochs of a trial's fine-tuning: from its route's manifest when the stage is done,
    its published model when the training ended but the trial was stopped before the stage's record
    (Tune stops a trial at its last report), its checkpoint when stopped early or interrupted, else none."""
    route_uri = SweepLayout(sweep_uri).trial(trial_id, spec.rule).stage(spec.route)
    manifest = storage.read_manifest(route_uri)
    if manifest is not None:
        return list(manifest["summary"]["history"])
    if storage.exists(layout.model_file(route_uri)):
        return finished_state(layout.model_file(route_uri)).history
    training = read_training(layout.checkpoint_file(route_uri))
    return list(training["history"]) if training else []


def _append_event(uri: str, event: dict[str, Any]) -> None:
    before = storage.read_bytes(uri) if storage.exists(uri) else b""
    storage.write_bytes(uri, before + (json.dumps(event) + "\n").encode())


def run_trial(
    config: Config,
    sweep_uri: str,
    trial_id: str,
    spec: TrialSpec,
    report: Callable[[dict[str, Any]], None],
    executor: Executor,
    log=print,
) -> dict[str, Any]:
    """One trial: partition, prune, fine-tune (`executor.train` reports every epoch to `report`).

    A trial that ran before replays its finished epochs to `report` and continues after them (a
    finished one trains nothing). A setting that cannot work (a tau that leaves no clean samples, a
    learning rate whose training diverges) ends the trial as infeasible: one report with a NaN objective,
    and the reason in infeasible.json.
    """
    lay = SweepLayout(sweep_uri)
    history = trial_history(sweep_uri, trial_id, spec)
    event = {"event": "start", "trial_id": trial_id, "epochs_done": len(history), "time": time.time()}
    _append_event(lay.trial_file(trial_id, "events.jsonl"), event)
    storage.write_json(lay.trial_file(trial_id, "spec.json"), spec.to_dict())
    trial_layout = lay.trial(trial_id, spec.rule)
    validate_on = validation_uri(config, sweep_uri, trial_layout)
    run = Run(trial_config(config, spec), trial_layout, executor, log, validate_on=validate_on)

    def infeasible(e: RaypipeError) -> dict[str, Any]:
        storage.write_json(lay.trial_file(trial_id, "infeasible.json"), {"message": str(e)})
        log(f"[trial {trial_id}] infeasible: {e}")
        report({"epoch": 0, METRIC: float("nan"), "infeasible": 1})
        return {"infeasible": str(e)}

    try:
        run.run(["partition", "prune"])
    except RaypipeError as e:
        return infeasible(e)
    for metrics in history:  # replay: Tune (and ASHA) see the whole history again, nothing is retrained
        report(metrics)
    try:
        run.run([spec.route])
    except TrainingDiverged as e:  # a learning rate too large for this trial: its objective is NaN
        return infeasible(e)
    result = {
        "trial_id": trial_id,
        "spec": spec.to_dict(),
        "partition": run.summary("partition"),
        "prune": run.summary("prune"),
        "history": trial_history(sweep_uri, trial_id, spec),
    }
    storage.write_json(lay.trial_file(trial_id, "result.json"), result)
    return result
