"""What an L-FT epoch costs against a full-model epoch, per model, and the arithmetic floor of that ratio.

L-FT trains the head (probe layer and last layer) on the frozen backbone's features, which the
attribution pass keeps (`CachedFeatures`): an epoch is the head's forward and backward on [N, F]
features. A full-model epoch (F-FT, Retrain, the Initial) is the whole network's forward and backward.
The ratio of their FLOPs per training step (torch's FlopCounterMode, batch of the shipped configs) is
what an L-FT epoch would cost if time followed FLOPs (the head's small matrix products run no faster
per FLOP than the backbone's convolutions, so in practice it is a floor); the measured seconds say how
close the one training loop (`prepare` + `train_epoch`) comes to it.

Inputs are random tensors of each model's input shape (cost does not depend on content), fresh
models, Adam at the shipped batch 128. Timings alternate the two epochs within each repeat so load
drift hits both alike; the median over repeats is reported.

    .venv/bin/python bench/lft_cost.py [--quick] [--results DIR]
"""

from __future__ import annotations

import statistics
import time

import common as C
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

GOAL = 0.01  # an L-FT epoch <= 1% of a full-model epoch
BATCH = 128
# (model, input shape, training samples per epoch): sizes chosen so one full epoch takes seconds here.
MODELS = (("mlp", (64,), 20_000), ("cnn_small", (1, 28, 28), 20_000), ("resnet18_cifar", (3, 32, 32), 1_024))


def step_flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def flops_ratio(model, shape: tuple[int, ...]) -> dict:
    """FLOPs of one training step (forward + backward, batch BATCH) of the head on features and of the whole model."""
    x, y = torch.randn(BATCH, *shape), torch.zeros(BATCH, dtype=torch.long)
    full = step_flops(lambda: F.cross_entropy(model(x), y).backward())
    features = model.features(x).detach()
    head = step_flops(lambda: F.cross_entropy(model.head_from_probe(model.probe(features)), y).backward())
    model.zero_grad(set_to_none=True)
    return {"feature_dim": int(features.shape[1]), "full_gflops": full / 1e9, "head_gflops": head / 1e9}


def measure(name: str, shape: tuple[int, ...], n: int, repeats: int) -> dict:
    from raypipe.config import ModelConfig, TrainConfig
    from raypipe.core.models import build_model
    from raypipe.training.loop import CachedFeatures, InMemory, backbone_features, prepare, train_epoch

    torch.manual_seed(0)
    cfg = TrainConfig(epochs=1, batch_size=BATCH)
    x = np.random.default_rng(0).random((n, *shape), dtype=np.float32)
    y = np.random.default_rng(1).integers(0, 10, n)
    data = InMemory.from_arrays(x, y, np.arange(n), BATCH, seed=0)
    device = torch.device("cpu")
    full_model = build_model(ModelConfig(name=name, probe_width=256), shape, 10)
    flops = flops_ratio(full_model, shape)
    full, full_opt, full_data = prepare(full_model, "f_ft", cfg, data, device)

    head_model = build_model(ModelConfig(name=name, probe_width=256), shape, 10)
    s = time.perf_counter()
    features = backbone_features(head_model, data.x, device)  # what the attribution pass keeps, [N, F]
    features_s = time.perf_counter() - s
    given = CachedFeatures.given(InMemory(features, data.y, data.ids, BATCH, seed=0))
    head, head_opt, head_data = prepare(head_model, "l_ft", cfg, given, device)

    epochs = {
        "full": lambda e: train_epoch(full, full_data.batches(e), full_opt, "f_ft", device),
        "l_ft": lambda e: train_epoch(head, head_data.batches(e), head_opt, "l_ft", device),
    }
    for run in epochs.values():  # warm-up
        run(0)
    seconds: dict[str, list[float]] = {k: [] for k in epochs}
    loads = []
    for r in range(repeats):
        loads.append(C.loadavg())
        for k, run in epochs.items():
            s = time.perf_counter()
            run(r + 1)
            seconds[k].append(time.perf_counter() - s)
    full_s, lft_s = statistics.median(seconds["full"]), statistics.median(seconds["l_ft"])
    return {
        "model": name,
        "input_shape": list(shape),
        "n": n,
        **flops,
        "flops_floor": flops["head_gflops"] / flops["full_gflops"],
        "full_epoch_s": full_s,
        "lft_epoch_s": lft_s,
        "lft_over_full": lft_s / full_s,
        "features_once_s": features_s,
        "seconds_all": seconds,
        "loadavg_per_repeat": loads,
    }


def main() -> None:
    args = C.parser(__doc__, runs=False).parse_args()
    C.set_threads(args.threads)
    b = C.Bench("lft_cost", args, "random")  # no data set: cost does not depend on the pixels
    scale, repeats = (0.02, 1) if b.quick else (1.0, 5)
    runs = []
    for name, shape, n in MODELS:
        print(f"== {name}", flush=True)
        runs.append(measure(name, shape, max(BATCH, int(n * scale)), repeats))
    rows = [
        [
            r["model"],
            r["n"],
            r["feature_dim"],
            f"{r['full_epoch_s']:.3f}",
            f"{r['lft_epoch_s']:.4f}",
            f"{100 * r['lft_over_full']:.2f}%",
            f"{100 * r['flops_floor']:.3f}%",
            f"{r['features_once_s']:.2f}",
        ]
        for r in runs
    ]
    header = [
        "model",
        "samples",
        "features F",
        "full epoch s",
        "L-FT epoch s",
        "L-FT / full",
        "FLOPs floor",
        "features once s",
    ]
    goal_rows = [
        [
            f"{r['model']}: an L-FT epoch <= 1% of a full-model epoch",
            f"{100 * r['lft_over_full']:.2f}% (floor {100 * r['flops_floor']:.3f}%)",
            r["lft_over_full"] <= GOAL,
        ]
        for r in runs
    ]
    md = [
        "Median of the repeats; both epochs through raypipe's training loop, batch 128, Adam, one thread. "
        "`FLOPs floor` = the head's FLOPs per training step over the whole model's: what an L-FT epoch "
        "would cost, as a fraction of a full epoch, if time followed FLOPs. `features once` = the backbone pass over "
        "the training samples that the attribution pass does anyway (kept for L-FT).",
        "",
        C.md_table(header, rows),
        "",
        *C.goals_md(goal_rows),
    ]
    b.write(
        "An L-FT epoch against a full-model epoch", "\n".join(md), {"runs": runs}, {"batch": BATCH, "repeats": repeats}
    )


if __name__ == "__main__":
    main()
