"""The Ray pipeline on GPUs, in one go (a few minutes, well within 10 on one modern GPU): samples/s per
GPU of the attribution and of each training route, with `resnet18_cifar` on a CIFAR-shaped synthetic set.

The data is written here (`synthetic_cifar`: 3x32x32 uint8 images, 10 classes, each class a fixed
random pattern under heavy pixel noise, seeded), so the script needs no download; the settings are
the paper's CIFAR-10 ones (jobs/configs/cifar10.yaml: Gaussian input noise on half the images, the
paper's attribution rule) with few epochs: the numbers are throughput, not accuracy. The run fails
before any work when the Ray cluster has no GPU (`ray.use_gpu=true`); `--quick` is the CPU smoke test
of the same script (a few hundred images, cnn_small, GPUs only when there are some).

    .venv/bin/python bench/gpu.py [--quick] [--n 50000] [--epochs 2] [--ft-epochs 1] [--results DIR] [--runs DIR]
"""

from __future__ import annotations

import time
from pathlib import Path

import common as C
import numpy as np
import ray

from raypipe import api, storage
from raypipe.config import load_config
from raypipe.layout import RunLayout

IMAGE_SHAPE = (3, 32, 32)
CLASSES = 10
CIFAR_CONFIG = C.ROOT / "jobs" / "configs" / "cifar10.yaml"


def synthetic_cifar(path: Path, n: int, seed: int = 0, chunk: int = 8192) -> None:
    """`n` CIFAR-shaped samples to Parquet (raypipe's parquet source: `image` fixed_size_list<uint8>[3072],
    `label` int64), written in chunks: class c's images are its pattern (uniform in [64, 192)) plus
    N(0, 40^2) pixel noise, clipped to [0, 255]; labels uniform over the 10 classes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    patterns = rng.uniform(64, 192, size=(CLASSES, int(np.prod(IMAGE_SHAPE)))).astype(np.float32)
    schema = pa.schema([("image", pa.list_(pa.uint8(), patterns.shape[1])), ("label", pa.int64())])
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n, chunk):
            labels = rng.integers(0, CLASSES, size=min(chunk, n - start))
            noise = rng.normal(0.0, 40.0, size=(len(labels), patterns.shape[1])).astype(np.float32)
            pixels = np.clip(np.rint(patterns[labels] + noise), 0, 255).astype(np.uint8)
            images = pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), patterns.shape[1])
            writer.write_table(pa.Table.from_arrays([images, pa.array(labels, pa.int64())], schema=schema))


def overrides(data_path: Path, quick: bool, epochs: int, ft_epochs: int) -> list[str]:
    ep = [f"initial.epochs={epochs}", *[f"{r}.epochs={ft_epochs}" for r in ("l_ft", "f_ft", "retrain")]]
    return [
        "data.source=parquet",
        f"data.path={data_path.resolve()}",
        f"data.shape={list(IMAGE_SHAPE)}",
        f"data.num_classes={CLASSES}",
        "noise.apply_to=any",  # a benchmark table: the configured label noise goes in, as on a built-in set
        "data.shard_rows=256" if quick else "data.shard_rows=4096",
        *(["model.name=cnn_small", "ray.use_gpu=auto"] if quick else ["model.name=resnet18_cifar", "ray.use_gpu=true"]),
        *ep,
        "run.executor=ray",
        "ray.address=local",  # a Ray of its own on this machine, with every GPU it has
    ]


def throughput(report: dict, manifests: dict, gpus: int) -> dict[str, dict]:
    """Samples/s per GPU of the attribution (over the stage's wall time, its actors' start included) and of
    each training route (over the loop's training seconds, per worker: a GPU each when there are GPUs)."""
    rows, seconds = manifests["attribution"]["summary"]["rows"], manifests["attribution"]["seconds"]
    out = {"attribution": {"samples": rows, "seconds": seconds, "samples_per_s_per_gpu": rows / seconds / max(gpus, 1)}}
    for route, m in report["routes"].items():
        workers = m.get("num_workers", 1)
        seen = sum(h["n"] for h in manifests[route]["summary"]["history"]) * workers  # "n": rank 0's samples
        out[route] = {
            "samples": seen,
            "seconds": m["seconds_train"],
            "samples_per_s_per_gpu": seen / m["seconds_train"] / workers,
            "workers": workers,
        }
    return out


def gpu_names() -> list[str]:
    import torch

    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def main() -> None:
    parser = C.parser(__doc__)
    parser.add_argument("--n", type=int, default=50_000, help="synthetic samples (train, val and test together)")
    parser.add_argument("--epochs", type=int, default=2, help="Initial epochs")
    parser.add_argument("--ft-epochs", type=int, default=1, help="L-FT, F-FT and Retrain epochs")
    args = parser.parse_args()
    C.set_threads(args.threads)
    b = C.Bench("gpu", args, data="synthetic-cifar")
    n = 400 if b.quick else args.n
    data_path = b.runs(f"synthetic_cifar_{n}.parquet")
    t0 = time.perf_counter()
    synthetic_cifar(data_path, n)
    write_s = time.perf_counter() - t0
    config = load_config(str(CIFAR_CONFIG), overrides(data_path, b.quick, args.epochs, args.ft_epochs))
    out = C.fresh_dir(b.runs("run"))
    log = C.log_to(b.runs("log.txt"))
    started = time.perf_counter()
    report = api.run(config, str(out), log=log)
    wall = time.perf_counter() - started
    gpus = int(ray.cluster_resources().get("GPU", 0))
    lay = RunLayout(str(out.resolve()))
    manifests = {name: storage.read_manifest(lay.stage(name)) for name in report["stages_seconds"]}
    rates = throughput(report, manifests, gpus)
    rows = [
        [stage, r["samples"], C.fmt(r["samples_per_s_per_gpu"], 0), r.get("workers", "—")] for stage, r in rates.items()
    ]
    body = [
        f"GPUs: {gpus} ({', '.join(gpu_names()) or 'none'}); Ray pipeline wall {wall:.1f} s, synthetic data written in "
        f"{write_s:.1f} s. Fine-tuning samples/s: samples the loop trained on over its training seconds; "
        "attribution: rows over the stage's wall seconds (actor start-up and model load included).",
        "",
        C.md_table(["stage", "samples", "samples / s per GPU", "workers"], rows),
        "",
        C.md_table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in report["stages_seconds"].items()]),
        "",
        *C.goals_md([["the whole Ray pipeline in one go within 10 minutes", f"{wall:.0f} s", wall <= 600]]),
    ]
    b.write(
        "The Ray pipeline on GPUs: samples / s per GPU",
        "\n".join(body),
        {"gpus": gpus, "gpu_names": gpu_names(), "throughput": rates, "wall_seconds": wall, "report": report},
        {"samples": n, "model": config.model.name, "initial epochs": args.epochs, "fine-tuning epochs": args.ft_epochs},
    )


if __name__ == "__main__":
    main()
