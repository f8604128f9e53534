"""Every path under a run and under a sweep, in one place.

A run directory (a local path, ``s3://`` or ``gs://``) holds one folder per stage, each finished by
its ``_manifest.json``, plus the run's own files::

    <run>/config.yaml                      the resolved config of the last invocation
    <run>/_lock.json                       the run writing here now (pid, host, start), while it runs
    <run>/report.json, report.md, plots/   the report and its pictures
    <run>/data/train/part-NNNNN.parquet    training shards (the unit of parallel, resumable work)
    <run>/data/val/part-00000.parquet, data/test/part-00000.parquet
    <run>/initial/model.pt                 the model to repair (+ trajectory/, early_model.pt when raypipe trained it)
    <run>/attribution/samples/part-NNNNN.parquet    one row per training sample, aligned with the data shards
    <run>/attribution/features/part-NNNNN.parquet   the backbone's features (the head's input), kept
                                           when L-FT will train the head on them (same shard names)
    <run>/attribution/val/part-00000.parquet   the same pass over the validation split
    <run>/partition/split/part-NNNNN.parquet   p_noisy, is_clean, suggested label, aligned likewise
    <run>/partition/signals/part-NNNNN.parquet every detection signal per sample, aligned likewise
    <run>/partition/issues/part-00000.parquet  the label issues table (every training sample, most suspect first)
    <run>/partition/val/part-00000.parquet     the validation split's detection (p_noisy, is_clean, signals)
    <run>/partition/val_cleaned/part-00000.parquet  the validation samples detected as clean (sample table)
    <run>/partition/mixture.json
    <run>/prune/model.pt, neurons.json
    <run>/<route>/model.pt                 l_ft, f_ft, retrain (checkpoint.pt while training)

Every folder of Parquet files holds one data set (one schema, one row per sample): `pandas.read_parquet(folder)`
and `ray.data.read_parquet(folder)` read it whole; JSON files sit beside those folders, never in them.

A sweep directory holds the stages every trial shares once (``base/``), one attribution per rule,
and a run directory per trial whose upstream stages are those shared folders (see `SweepLayout`).

Stage bodies get their folders from here (`RunLayout.stage`) and name the files inside them with
the functions below, so the pipeline, the sweep, the report, the plots, tests and benchmarks all
find a file the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raypipe.storage import join

MANIFEST = "_manifest.json"
PENDING = "_pending.json"
# Held by the run writing to a run (or sweep) folder, with its owner: one run per folder at a time.
LOCK = "_lock.json"
# Folders of a stage that are not its outputs (Ray Train's own run state): a manifest does not list them.
UNTRACKED = ("ray_train",)


def shard_name(index: int) -> str:
    """The file name of shard `index` (training data, attribution and partition shards share it)."""
    return f"part-{index:05d}.parquet"


# ---------------------------------------------------------------------------------------------
# Files inside a stage folder (each function takes the stage's folder URI).


# Bumped when folders move: a stage finished under another layout is computed again (its fingerprint differs).
LAYOUT_VERSION = 3  # 3: attribution/{samples,features}/


def split_dir(data_uri: str, split: str) -> str:
    """The folder of one split of the data stage: `train` (its shards), `val` or `test` (one file each)."""
    return join(data_uri, split)


def train_dir(data_uri: str) -> str:
    return split_dir(data_uri, "train")


def split_file(data_uri: str, split: str) -> str:
    """The one file of the `val` or `test` split of the data stage."""
    return join(split_dir(data_uri, split), shard_name(0))


def model_file(stage_uri: str) -> str:
    return join(stage_uri, "model.pt")


def checkpoint_file(stage_uri: str) -> str:
    """The resumable training checkpoint of a training stage (model, optimizer, epoch, history, callbacks)."""
    return join(stage_uri, "checkpoint.pt")


def failure_file(stage_uri: str) -> str:
    """Why a training stage stopped on every worker at once (a diverged loss), for the driver to say."""
    return join(stage_uri, "_failed.json")


def early_model_file(stage_uri: str) -> str:
    """The initial model as it was at an early epoch (detection.early_epoch), before it fit its wrong labels."""
    return join(stage_uri, "early_model.pt")


def trajectory_dir(stage_uri: str) -> str:
    return join(stage_uri, "trajectory")


def trajectory_file(stage_uri: str) -> str:
    return join(trajectory_dir(stage_uri), "part-00000.parquet")


def ray_train_dir(stage_uri: str) -> str:
    """Ray Train's own storage for one training stage (its run state; our checkpoints live beside it)."""
    return join(stage_uri, "ray_train")


def attribution_dir(attribution_uri: str) -> str:
    """The attribution stage's per-sample shards (probe activations, attribution, loss, ...), named like the
    training data shards they were computed from."""
    return join(attribution_uri, "samples")


def features_dir(attribution_uri: str) -> str:
    """The backbone features [N, F] the attribution pass keeps for L-FT, one shard per attribution shard."""
    return join(attribution_uri, "features")


def features_shard(attribution_shard_uri: str) -> str:
    """The features shard of an attribution shard: the same name, in the stage's `features_dir`."""
    samples, name = attribution_shard_uri.rsplit("/", 1)
    return join(features_dir(samples.rsplit("/", 1)[0]), name)


def val_attribution_file(attribution_uri: str) -> str:
    """The attribution pass over the validation split (its own detection, to choose a route without the test)."""
    return join(attribution_uri, "val", shard_name(0))


def val_detection_file(partition_uri: str) -> str:
    """The validation split's signals, p_noisy and is_clean, decided like the training split's."""
    return join(partition_uri, "val", shard_name(0))


def cleaned_val_file(partition_uri: str) -> str:
    """The validation samples detected as clean, in the data's sample-table format: what routes are scored on."""
    return join(partition_uri, "val_cleaned", shard_name(0))


def signals_dir(partition_uri: str) -> str:
    return join(partition_uri, "signals")


def partition_dir(partition_uri: str) -> str:
    """The partition's per-sample shards (p_noisy, is_clean, ...), named like the attribution shards."""
    return join(partition_uri, "split")


def label_issues_dir(partition_uri: str) -> str:
    return join(partition_uri, "issues")


def label_issues_file(partition_uri: str) -> str:
    return join(label_issues_dir(partition_uri), shard_name(0))


def mixture_file(partition_uri: str) -> str:
    return join(partition_uri, "mixture.json")


def neurons_file(prune_uri: str) -> str:
    return join(prune_uri, "neurons.json")


def validation_file(uri: str) -> str:
    """The validation set a sweep scores its trials on, written once in raypipe's sample-table format."""
    return join(uri, "validation.parquet")


# ---------------------------------------------------------------------------------------------
# A run, and a sweep.


@dataclass(frozen=True)
class RunLayout:
    """The folders of one run. `shared` maps a stage name to a folder outside `root` that holds it
    (a sweep trial reads the sweep's shared data, initial model and attribution from there)."""

    root: str
    shared: dict[str, str] = field(default_factory=dict)

    def stage(self, name: str) -> str:
        return self.shared.get(name) or join(self.root, name)

    def model(self, stage: str) -> str:
        return model_file(self.stage(stage))

    @property
    def config_file(self) -> str:
        return join(self.root, "config.yaml")

    @property
    def lock_file(self) -> str:
        return join(self.root, LOCK)

    @property
    def report_json(self) -> str:
        return join(self.root, "report.json")

    @property
    def report_md(self) -> str:
        return join(self.root, "report.md")

    @property
    def plots_dir(self) -> str:
        return join(self.root, "plots")

    def plot(self, name: str) -> str:
        """`name` without extension -> <run>/plots/<name>.png"""
        return join(self.plots_dir, f"{name}.png")


@dataclass(frozen=True)
class SweepLayout:
    """``<sweep>/base/{data,initial}`` once; ``base/<rule>/attribution`` once per rule; ``trials/<id>/``
    a run directory per trial; ``tune/`` Ray Tune's experiment; ``best/`` the chosen trial's outputs."""

    root: str

    @property
    def base(self) -> RunLayout:
        return RunLayout(join(self.root, "base"))

    def rule(self, rule: str) -> RunLayout:
        """Where the attribution of `rule` lives (data and initial model shared from the base)."""
        base = self.base
        return RunLayout(join(base.root, rule), {"data": base.stage("data"), "initial": base.stage("initial")})

    def trial(self, trial_id: str, rule: str) -> RunLayout:
        """A trial's own run directory; its data, initial model and attribution are the sweep's shared ones."""
        upstream = self.rule(rule)
        shared = {**upstream.shared, "attribution": upstream.stage("attribution")}
        return RunLayout(self.trial_dir(trial_id), shared)

    def trial_dir(self, trial_id: str) -> str:
        return join(self.root, "trials", trial_id)

    def trial_file(self, trial_id: str, name: str) -> str:
        """A trial's own records: spec.json (its hyperparameters), events.jsonl (one line per start of
        its body), infeasible.json (why its settings cannot work), result.json (what it ended with)."""
        return join(self.trial_dir(trial_id), name)

    @property
    def config_file(self) -> str:
        return join(self.root, "config.yaml")

    @property
    def lock_file(self) -> str:
        return join(self.root, LOCK)

    @property
    def settings_file(self) -> str:
        return join(self.root, "sweep_settings.json")

    @property
    def validation(self) -> str:
        return validation_file(self.base.root)

    @property
    def tune(self) -> str:
        return join(self.root, "tune")

    @property
    def best(self) -> str:
        return join(self.root, "best")

    def trials_table(self, suffix: str) -> str:
        """trials.csv / trials.parquet"""
        return join(self.root, f"trials.{suffix}")

    def plot(self, name: str) -> str:
        return join(self.root, "plots", f"{name}.png")
