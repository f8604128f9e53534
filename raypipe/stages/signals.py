"""The partition stage's per-sample detection signals, computed shard by shard where the shards are.

- `ProbeSpaces`: what the driver ships to every worker: a kNN reference index per probe space (the final
  model's ``probe``, and the early model's ``probe_early`` when the attribution pass computed it) and the
  per-class principal directions of the final probe space (FINE);
- `signal_shard`: one attribution shard -> its signals (scalars and two neighbour labels per sample);
- `read_trajectory`: the training trajectory's signals, aligned to the samples.
- `records_trajectory`, `early_model_epoch`, `missing_signals`: which signals a run can have, from its settings.

Output columns of a signals shard: sample_id, label, pred_label, loss, p_attribution, and per probe space
`<space>_agreement`, `<space>_suggested`, `<space>_counts` [C] (knn, knn_early), `fine_alignment`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from raypipe import storage
from raypipe.config import Config, DetectionConfig
from raypipe.core.detection import KnnIndex
from raypipe.core.detection.fine import ClassGram, alignment
from raypipe.core.detection.transition import neighbourhood_noise_posterior
from raypipe.core.mixture import MixtureFit
from raypipe.tables import columns_from_table, table_from_columns

# kNN signal name -> the attribution column holding its probe space.
PROBE_COLUMNS = {"knn": "probe", "knn_early": "probe_early"}


# Which signals a run can have, from its settings alone (the stage table asks before any work).


def records_trajectory(cfg: Config) -> bool:
    """The training trajectory is a detection signal when raypipe trains the initial model itself. It is
    recorded whatever detection.signal says, so that changing the signal reruns only the partition."""
    return cfg.detection.aum_epochs > 0 and cfg.model.checkpoint is None


def early_model_epoch(cfg: Config) -> int:
    """The epoch whose initial model is kept as ``early_model.pt`` (its probe space is a detection signal's):
    detection.early_epoch when raypipe trains the initial model for more epochs than that, else 0 (none)."""
    trains = cfg.model.checkpoint is None and cfg.detection.early_epoch < cfg.initial.epochs
    return cfg.detection.early_epoch if trains else 0


def missing_signals(cfg: Config) -> dict[str, str]:
    """The detection signals this run cannot have, and why (the report says so)."""
    missing = {}
    if cfg.model.checkpoint is not None:
        why = "model.checkpoint is given: raypipe did not train it, so it has no"
        missing["trajectory"] = f"{why} training trajectory (aum, early_loss, wrong_events)"
        missing["knn_early"] = f"{why} early checkpoint"
    else:
        if cfg.detection.aum_epochs == 0:
            missing["trajectory"] = "detection.aum_epochs=0: no training trajectory recorded"
        if not early_model_epoch(cfg):
            missing["knn_early"] = (
                f"no early checkpoint (detection.early_epoch={cfg.detection.early_epoch}, "
                f"initial.epochs={cfg.initial.epochs})"
            )
    return missing


def sample_shard(uri: str, keep_probability: float, seed: int) -> dict[str, np.ndarray]:
    """A Bernoulli(keep_probability) sample of one attribution shard's (attribution, loss) rows."""
    table = storage.read_table(uri, columns=["sample_id", "attribution", "loss"])
    cols = columns_from_table(table)
    # Seeded by sample ids, not by shard order: the same rows are drawn wherever this runs.
    rng = np.random.default_rng([seed, int(cols["sample_id"][0]) if len(cols["sample_id"]) else 0])
    keep = rng.random(len(cols["sample_id"])) < keep_probability
    return {k: v[keep] for k, v in cols.items()}


def reference_rows(uri: str, keep_probability: float, seed: int, column: str = "probe") -> dict[str, np.ndarray]:
    """A Bernoulli(keep_probability) sample of one shard's (sample_id, `column`, label): kNN reference rows."""
    cols = columns_from_table(storage.read_table(uri, columns=["sample_id", column, "label"]))
    rng = np.random.default_rng([seed, 7, int(cols["sample_id"][0]) if len(cols["sample_id"]) else 0])
    keep = rng.random(len(cols["sample_id"])) < keep_probability
    return {"sample_id": cols["sample_id"][keep], "probe": cols[column][keep], "label": cols["label"][keep]}


def build_knn_index(
    shards: list[str], n_rows: int, det: DetectionConfig, num_classes: int, seed: int, executor, column: str = "probe"
) -> KnnIndex:
    """The reference set: all rows, or a uniform sample of about det.max_reference (driver memory bounded)."""
    keep_probability = min(1.0, det.max_reference / max(n_rows, 1))
    parts = executor.map(lambda uri: reference_rows(uri, keep_probability, seed, column), shards, "knn reference")
    ref = {k: np.concatenate([p[k] for p in parts]) for k in ("sample_id", "probe", "label")}
    return KnnIndex.build(ref["probe"], ref["label"], num_classes, ref_ids=ref["sample_id"])


def class_gram_shard(uri: str, num_classes: int) -> dict[str, np.ndarray]:
    """One shard's per-class sums of z z^T over its normalized final probe activations (FINE)."""
    cols = columns_from_table(storage.read_table(uri, columns=["probe", "label"]))
    return ClassGram(num_classes, cols["probe"].shape[1]).update(cols["probe"], cols["label"]).to_dict()


@dataclass
class ProbeSpaces:
    """What every worker scores its shard against: kNN indices by signal name, FINE's class directions [C, d]."""

    indices: dict[str, KnnIndex] = field(default_factory=dict)
    directions: np.ndarray | None = None

    @classmethod
    def build(
        cls,
        shards: list[str],
        columns: list[str],
        n_rows: int,
        det: DetectionConfig,
        num_classes: int,
        seed: int,
        executor,
    ) -> ProbeSpaces:
        """The probe spaces the settings need, of those the attribution shards hold (`columns`: ``probe``, and
        ``probe_early`` when the attribution pass computed it). kNN runs for the knn / auto signals and for the
        auto / quota decisions (the noise transition estimate reads its neighbour labels); FINE for fine / auto."""
        indices: dict[str, KnnIndex] = {}
        if det.signal in ("knn", "auto") or det.decision in ("auto", "quota"):
            indices = {
                name: build_knn_index(shards, n_rows, det, num_classes, seed, executor, column)
                for name, column in PROBE_COLUMNS.items()
                if column in columns
            }
        directions = None
        if det.signal in ("fine", "auto"):
            parts = executor.map(lambda uri: class_gram_shard(uri, num_classes), shards, "class directions")
            gram = ClassGram.from_dict(parts[0])
            for part in parts[1:]:
                gram.merge(ClassGram.from_dict(part))
            directions = gram.directions()
        return cls(indices, directions)


def signal_shard(in_uri: str, out_uri: str, fit: MixtureFit, spaces: ProbeSpaces, det: DetectionConfig) -> int:
    """One attribution shard -> its per-sample signals (scalars, and the neighbours' label counts per space): the
    attribution mixture's p_noisy, the loss, the kNN label agreement per probe space with the neighbours' majority
    label, and the alignment with the given class's direction (FINE)."""
    keep = ["sample_id", "label", "pred_label", "best_other_label", "loss", "attribution", "true_label", "is_corrupted"]
    table = storage.read_table(in_uri)
    cols = columns_from_table(table, [c for c in keep if c in table.column_names])
    cols["p_attribution"] = fit.p_noisy(cols.pop("attribution"))
    for name, index in spaces.indices.items():
        probe = columns_from_table(table, [PROBE_COLUMNS[name]])[PROBE_COLUMNS[name]]  # [B, d]
        votes = index.votes(
            probe, cols["label"], det.k, query_ids=cols["sample_id"], class_balanced=det.class_balanced, counts=True
        )
        cols[f"{name}_agreement"] = votes.agreement.astype(np.float32)
        cols[f"{name}_suggested"] = votes.suggested_label.astype(np.int64)
        cols[f"{name}_counts"] = votes.counts
    if spaces.directions is not None:
        probe = columns_from_table(table, ["probe"])["probe"]
        cols["fine_alignment"] = alignment(probe, cols["label"], spaces.directions)
    storage.write_table(out_uri, table_from_columns(cols))
    return len(cols["sample_id"])


def read_trajectory(trajectory_uri: str | None, sample_id: np.ndarray) -> dict[str, np.ndarray]:
    """-AUM, the early loss and the wrong-event share aligned to `sample_id`, when the initial training recorded
    them (suspicion scores: higher = more suspect)."""
    if trajectory_uri is None or not storage.list_files(trajectory_uri, ".parquet"):
        return {}
    t = columns_from_table(
        pa.concat_tables([storage.read_table(u) for u in storage.list_files(trajectory_uri, ".parquet")])
    )
    order = np.argsort(t["sample_id"])
    pos = np.searchsorted(t["sample_id"], sample_id, sorter=order)
    pos = order[np.minimum(pos, len(order) - 1)]
    if not np.array_equal(t["sample_id"][pos], sample_id):
        return {}  # a partial trajectory (e.g. a shard too big to cache on a worker): not a usable signal
    out = {"aum": -t["aum"][pos]}  # higher = more suspect
    if np.isfinite(t["early_loss"][pos]).all():
        out["early_loss"] = t["early_loss"][pos]
    if "wrong_events" in t and (t["epochs_recorded"][pos] > 0).all():
        out["wrong_events"] = t["wrong_events"][pos] / t["epochs_recorded"][pos]
    return out if np.isfinite(out["aum"]).all() else {}


def gather_signals(
    cols: dict[str, np.ndarray], trajectory_uri: str | None, transition: dict | None = None
) -> dict[str, np.ndarray]:
    """Every suspicion score the signal shards and the trajectory hold (higher = more suspect); with the noise
    transition estimate (`transition`, from the partition), also `knn_bayes`: the chance the label is wrong given
    the neighbours' labels in the estimate's probe space (`neighbourhood_noise_posterior`)."""
    signals = {"attribution": cols["p_attribution"], "loss": cols["loss"]}
    for name in ("knn", "knn_early"):
        if f"{name}_agreement" in cols:
            signals[name] = 1.0 - cols[f"{name}_agreement"]
    if "fine_alignment" in cols:
        signals["fine"] = 1.0 - cols["fine_alignment"]
    if transition is not None and f"{transition['space']}_counts" in cols:
        t, prior = np.asarray(transition["estimate"]), np.asarray(transition["prior"])
        counts = cols[f"{transition['space']}_counts"]
        signals["knn_bayes"] = neighbourhood_noise_posterior(cols["label"], counts, t, prior)
    signals.update(read_trajectory(trajectory_uri, cols["sample_id"]))
    return signals
