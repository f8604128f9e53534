"""PNG plots of a finished run, written beside report.md under ``<run>/plots/``.

- ``plots/p_noisy.png``: histogram of the posterior p_noisy of every training sample, stacked by
  ground truth (clean / corrupted) when the experiment has it, with the threshold tau;
- ``plots/mixture.png``: for a 1-D attribution (e.g. rule ``loss``), the histogram of the raw
  attribution values with the two fitted Gaussian components mapped back to raw units; skipped
  when the mixture was fitted on a multi-dimensional (or PCA-reduced) attribution;
- ``plots/routes.png``: test accuracy and whole wall time per route;
- ``plots/transition_matrix.png``: the estimated noise transition matrix as a heatmap, beside the
  true one when the experiment has ground truth (skipped when no estimate was made);
- a sweep's ``plots/objective.png``: each trial's objective against tau, prune fraction and learning rate.

Every plot is rendered with a bare ``matplotlib.figure.Figure`` (no pyplot: no global figure
registry that could grow, no backend switch in the caller's process) into memory and written
through :mod:`raypipe.storage`, so s3:// and gs:// run URIs work. A plot that fails is logged in
one line and left out; it never fails the run.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from typing import Any

import numpy as np

from raypipe import layout, storage
from raypipe.config import ROUTE_TITLES, ROUTES
from raypipe.layout import RunLayout
from raypipe.stages.attribution import shards as attribution_shards
from raypipe.stages.partition import read_partition
from raypipe.tables import column_from_arrow

DPI = 110
MAX_MIXTURE_ROWS = 50_000  # rows of attribution read back for the mixture histogram (uniform sample)
CLEAN_COLOR = "tab:blue"
CORRUPTED_COLOR = "tab:red"
ROUTE_COLORS = {
    "initial": "tab:gray",
    "l_ft": "tab:blue",
    "f_ft": "tab:green",
    "relabel": "tab:purple",
    "retrain": "tab:orange",
}


def write_plots(run: RunLayout, report: dict[str, Any], log: Callable[[str], Any] = print) -> list[str]:
    """Write every plot that applies under the run's plots folder; return their paths relative to the run."""
    written: list[str] = []
    makers = (
        ("p_noisy", _p_noisy_figure),
        ("mixture", _mixture_figure),
        ("routes", _routes_figure),
        ("transition_matrix", _transition_figure),
    )
    for name, make in makers:
        uri = run.plot(name)
        shown = uri[len(run.root) :].lstrip("/")  # plots/<name>.png
        try:
            fig = make(run, report)
        except Exception as e:  # a plot is never worth failing a run for
            _warn(log, shown, e)
            fig = None
        if fig is not None and write_figure(fig, uri, log, shown):
            written.append(shown)
        else:  # does not apply to this run, or failed
            _remove_stale(uri)
    return written


def write_figure(fig, uri: str, log: Callable[[str], Any] = print, shown: str | None = None) -> bool:
    """Render `fig` to PNG in memory and write it to `uri`; a failure is logged in one line (naming the
    plot as `shown`), never raised."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=DPI)
        storage.write_bytes(uri, buf.getvalue())
        return True
    except Exception as e:  # a plot is never worth failing a run for
        _warn(log, shown or uri, e)
        return False
    finally:
        fig.clear()  # release artists at once; the Figure is not registered anywhere (no pyplot)


def _warn(log: Callable[[str], Any], shown: str, e: Exception) -> None:
    message = str(e).splitlines()[0] if str(e) else ""
    log(f"[plots] warning: {shown} not written: {type(e).__name__}: {message}")


def _remove_stale(uri: str) -> None:
    """A plot of an earlier run in this directory must not be mistaken for this run's."""
    with contextlib.suppress(Exception):  # best effort only
        storage.remove_tree(uri)


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


# ---------------------------------------------------------------------------------------------
# p_noisy


def _p_noisy_figure(run: RunLayout, report: dict[str, Any]):
    table = read_partition(run.stage("partition"), columns=["p_noisy"])
    p_noisy = column_from_arrow(table.column("p_noisy")).astype(np.float64)
    tau = float(report["partition"]["tau"])
    bins = np.linspace(0.0, 1.0, 51)

    fig = _new_figure(8.0, 5.2)
    ax = fig.add_subplot()
    if "is_corrupted" in table.column_names and "auroc" in report.get("detection", {}):  # the truth is known
        corrupted = column_from_arrow(table.column("is_corrupted")).astype(bool)
        groups = [p_noisy[~corrupted], p_noisy[corrupted]]
        labels = [f"clean (truth, n={len(groups[0]):,})", f"corrupted (truth, n={len(groups[1]):,})"]
        counts, _, _ = ax.hist(
            groups, bins=bins, stacked=True, color=[CLEAN_COLOR, CORRUPTED_COLOR], label=labels, alpha=0.85
        )
        totals = np.asarray(counts)[-1]  # stacked: the last layer is the total per bin
    else:
        totals, _, _ = ax.hist(p_noisy, bins=bins, color="tab:purple", alpha=0.85, label=f"all (n={len(p_noisy):,})")
    n_flagged = int((p_noisy >= tau).sum())
    ax.axvline(tau, color="black", linestyle="--", linewidth=1.5, label=f"tau = {tau:g} ({n_flagged:,} flagged noisy)")
    nonzero = np.asarray(totals)[np.asarray(totals) > 0]
    if len(nonzero) and nonzero.max() > 20 * np.median(nonzero):  # a few huge bins at 0 and 1 hide the middle
        ax.set_yscale("log")
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("p_noisy (posterior probability that the sample is noisy)")
    ax.set_ylabel("training samples" + (" (log scale)" if ax.get_yscale() == "log" else ""))
    title = f"p_noisy of {len(p_noisy):,} training samples"
    det = report.get("detection")
    if det and "f1" in det:
        title += f"\ndetection vs truth: F1 {det['f1']:.3f}, AUROC {det['auroc']:.3f}"
        title += f" (precision {det['precision']:.3f}, recall {det['recall']:.3f})"
    ax.set_title(title)
    fig.legend(loc="outside lower center", ncols=3, fontsize=9)  # outside: never hides a bar
    ax.grid(axis="y", alpha=0.3)
    return fig


# ---------------------------------------------------------------------------------------------
# mixture (1-D attribution only)


def _read_attribution_sample(run: RunLayout, n_rows_hint: int | None, seed: int = 0):
    """A uniform sample of at most MAX_MIXTURE_ROWS (attribution value, is_corrupted or None) rows."""
    shards = attribution_shards(run.stage("attribution"))
    if not shards:
        raise FileNotFoundError(f"no attribution shards under {layout.attribution_dir(run.stage('attribution'))}")
    keep = 1.0 if not n_rows_hint else min(1.0, 1.2 * MAX_MIXTURE_ROWS / n_rows_hint)
    rng = np.random.default_rng(seed)
    values, truth = [], []
    has_truth = True
    for uri in shards:
        try:
            table = storage.read_table(uri, columns=["attribution", "is_corrupted"])
        except Exception:  # no ground truth in this run
            table = storage.read_table(uri, columns=["attribution"])
        has_truth = has_truth and "is_corrupted" in table.column_names
        rows = rng.random(table.num_rows) < keep if keep < 1.0 else slice(None)
        values.append(column_from_arrow(table.column("attribution")).reshape(table.num_rows, -1)[rows, 0])
        if has_truth:
            truth.append(column_from_arrow(table.column("is_corrupted")).astype(bool)[rows])
    x = np.concatenate(values).astype(np.float64)
    y = np.concatenate(truth) if has_truth else None
    if len(x) > MAX_MIXTURE_ROWS:
        pick = np.sort(rng.choice(len(x), size=MAX_MIXTURE_ROWS, replace=False))
        x, y = x[pick], (y[pick] if y is not None else None)
    return x, y


def _mixture_figure(run: RunLayout, report: dict[str, Any]):
    mixture = json.loads(storage.read_bytes(layout.mixture_file(run.stage("partition"))))
    if mixture.get("pca", True) or len(mixture["means"][0]) != 1:
        return None  # multi-dimensional attribution: no 1-D picture of the fit
    n_rows = report.get("data", {}).get("rows", {}).get("train")
    x, corrupted = _read_attribution_sample(run, n_rows)
    finite = np.isfinite(x)
    x, corrupted = x[finite], (corrupted[finite] if corrupted is not None else None)

    # Components in raw units: raw = z * scale + mean.
    scale, shift = float(mixture["scale_scale"][0]), float(mixture["scale_mean"][0])
    weights = np.asarray(mixture["weights"], dtype=np.float64)
    means = np.asarray(mixture["means"], dtype=np.float64)[:, 0] * scale + shift
    sds = np.sqrt(np.asarray(mixture["covariances"], dtype=np.float64)[:, 0, 0]) * scale
    noisy = int(mixture["noisy_component"])

    lo, hi = np.quantile(x, [0.0, 0.995]) if len(x) else (0.0, 1.0)
    lo, hi = min(lo, *(means - 3 * sds)), max(hi, means[1 - noisy] + 3 * sds[1 - noisy])
    lo = max(lo, float(x.min())) if len(x) else lo  # no empty stretch left of the data
    if hi <= lo:
        hi = lo + 1.0
    bins = np.linspace(lo, hi, 61)
    clipped = int((x > hi).sum())

    fig = _new_figure(8.0, 5.2)
    ax = fig.add_subplot()
    shown = np.clip(x, lo, hi)  # the far tail goes into the last bin (said in the legend)
    if corrupted is not None:
        # stacked + density: the stack integrates to 1, comparable with the weighted components
        ax.hist(
            [shown[~corrupted], shown[corrupted]],
            bins=bins,
            stacked=True,
            density=True,
            color=[CLEAN_COLOR, CORRUPTED_COLOR],
            alpha=0.45,
            label=["clean samples (truth)", "corrupted samples (truth)"],
        )
    else:
        ax.hist(shown, bins=bins, density=True, color="tab:purple", alpha=0.45, label="all samples")

    grid = np.linspace(lo, hi, 600)
    dens = np.stack([w * _normal_pdf(grid, m, s) for w, m, s in zip(weights, means, sds, strict=True)])
    for k in range(2):
        role = "noisy" if k == noisy else "clean"
        ax.plot(
            grid,
            dens[k],
            color=CORRUPTED_COLOR if k == noisy else CLEAN_COLOR,
            linewidth=2.2,
            label=f"{role} component (w={weights[k]:.2f}, mean={means[k]:.3g}, sd={sds[k]:.3g})",
        )
    ax.plot(grid, dens.sum(axis=0), color="black", linewidth=1.0, linestyle=":", label="mixture total")

    # Where the split happens in raw units: p_noisy(x) = tau.
    tau = float(report["partition"]["tau"])
    p = dens[noisy] / np.maximum(dens.sum(axis=0), 1e-300)
    crossings = np.flatnonzero(np.diff(np.sign(p - tau)) != 0)
    made_split = report["partition"]["mixture"].get("made_the_split", True)
    for i, c in enumerate(crossings if made_split else []):  # the split's threshold only when this fit made it
        ax.axvline(
            grid[c], color="black", linestyle="--", linewidth=1.2, label=f"p_noisy = tau = {tau:g}" if i == 0 else None
        )

    rule = report.get("attribution", {}).get("rule", "?")
    ax.set_xlim(lo, hi)
    ax.set_xlabel(
        f"attribution value (rule '{rule}', raw units)" + (f"; {clipped:,} beyond in last bin" if clipped else "")
    )
    ax.set_ylabel("density")
    title = f"2-component Gaussian mixture on the 1-D attribution\n({len(x):,} training samples shown)"
    if not made_split:
        used = report.get("detection", {}).get("signals_used", {})
        title += (
            f"\none detection signal only: the split was decided by detection.signal={used.get('signal', '?')} "
            f"({', '.join(used.get('chosen', []))}), not by this fit"
        )
    ax.set_title(title, fontsize=10 if not made_split else None)
    n_entries = len(ax.get_legend_handles_labels()[1])
    fig.legend(loc="outside lower center", ncols=3 if n_entries % 3 == 0 else 2, fontsize=8)  # columns pair up
    ax.grid(axis="y", alpha=0.3)
    return fig


def _normal_pdf(x: np.ndarray, mean: float, sd: float) -> np.ndarray:
    sd = max(sd, 1e-12)
    return np.exp(-0.5 * ((x - mean) / sd) ** 2) / (sd * np.sqrt(2 * np.pi))


# ---------------------------------------------------------------------------------------------
# the noise transition matrix


def _transition_figure(run: RunLayout, report: dict[str, Any]):
    """T-hat (and the true T beside it when known) as heatmaps: rows the true class, columns the given label."""
    transition = report.get("detection", {}).get("transition_matrix")
    if not transition:
        return None
    panels = [("estimated", np.asarray(transition["estimate"]))]
    if "true" in transition:
        panels.append(("true (ground truth)", np.asarray(transition["true"])))
    c = len(panels[0][1])
    fig = _new_figure(1.0 + 4.6 * len(panels), 4.6)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (name, t) in zip(axes, panels, strict=True):
        image = ax.imshow(t, vmin=0.0, vmax=1.0, cmap="viridis")
        if c <= 12:  # the value of every cell, readable
            for i in range(c):
                for j in range(c):
                    ax.text(j, i, f"{t[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if t[i, j] > 0.5 else "white")  # fmt: skip
        ax.set_xlabel("given label")
        ax.set_ylabel("true class")
        ax.set_title(name)
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="P(given label | true class)")
    error = f", mean |T-hat - T| {transition['error']:.4f}" if "error" in transition else ""
    fig.suptitle(f"Noise transition matrix (from kNN label consensus in `{transition['space']}`){error}")
    return fig


# ---------------------------------------------------------------------------------------------
# routes


def _routes_figure(run: RunLayout, report: dict[str, Any]):
    routes = report.get("routes", {})
    names = [r for r in ROUTES if r in routes]
    if not names:
        return None
    fig = _new_figure(10.5, 4.4)
    ax_acc, ax_sec = fig.subplots(1, 2)
    xs = np.arange(len(names))
    titles = [ROUTE_TITLES[r] for r in names]
    colors = [ROUTE_COLORS[r] for r in names]

    acc = np.array([_number(routes[r].get("accuracy")) for r in names])
    bars = ax_acc.bar(xs, np.nan_to_num(acc), color=colors, width=0.6)
    ax_acc.bar_label(bars, labels=[f"{a:.4f}" if np.isfinite(a) else "n/a" for a in acc], padding=3)
    ax_acc.set_ylim(0.0, 1.1)
    ax_acc.set_ylabel("accuracy (clean test split)")
    ax_acc.set_title("Test accuracy per route")
    ax_acc.set_xticks(xs, titles)
    ax_acc.grid(axis="y", alpha=0.3)

    total = np.array([_number(routes[r].get("seconds_total")) for r in names])
    overhead = np.nan_to_num(np.array([_number(routes[r].get("seconds_overhead", 0.0)) for r in names]))
    is_repair = overhead > 0
    over = np.minimum(overhead, np.nan_to_num(total))  # the shared stages' part of the repair routes' total
    own = np.nan_to_num(total) - over
    ax_sec.bar(xs, own, color=colors, width=0.6)
    if over.any():
        from matplotlib.patches import Patch

        shared = dict(facecolor="white", edgecolor="black", hatch="//")
        ax_sec.bar(xs[is_repair], over[is_repair], bottom=own[is_repair], width=0.6, **shared)
        handles = [
            Patch(facecolor="lightgray", edgecolor="gray", label="the route's own training stage"),
            Patch(**shared, label="attribution + partition + prune (repair routes)"),
        ]
        fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=9)
    for x, t in zip(xs, total, strict=True):
        ax_sec.annotate(
            f"{t:.2f} s" if np.isfinite(t) else "n/a",
            (x, np.nan_to_num(t)),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
        )
    top = np.nanmax(total, initial=0.0) if np.isfinite(total).any() else 1.0
    ax_sec.set_ylim(0.0, max(top, 1e-3) * 1.15)
    ax_sec.set_ylabel("seconds (whole wall time)")
    ax_sec.set_title("Total seconds per route")
    ax_sec.set_xticks(xs, titles)
    ax_sec.grid(axis="y", alpha=0.3)
    return fig


def _number(value: Any) -> float:
    try:
        return float(value) if value is not None else float("nan")
    except (TypeError, ValueError):
        return float("nan")


# ---------------------------------------------------------------------------------------------
# a sweep's objective


RULE_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple")
ROUTE_MARKERS = {"l_ft": "o", "f_ft": "s", "relabel": "^"}


def objective_figure(rows: list[dict[str, Any]], objective: str, metric: str):
    """Objective against tau, prune fraction and lr; color = rule, marker = route, hollow = stopped early."""
    fig = _new_figure(12.0, 4.0)
    axes = fig.subplots(1, 3, sharey=True)
    rules = sorted({r["rule"] for r in rows})
    shown = [r for r in rows if np.isfinite(r[metric])]
    rng = np.random.default_rng(0)  # a little jitter, so trials at the same setting stay visible
    for ax, key, title in zip(
        axes, ("tau", "prune_fraction", "lr"), ("tau", "prune fraction", "learning rate"), strict=True
    ):
        values = np.array([r[key] for r in shown], dtype=float)
        several = len(np.unique(values)) > 1
        span = float(np.ptp(np.log10(values) if key == "lr" else values)) if several else 0.0
        for r in shown:
            color = RULE_COLORS[rules.index(r["rule"]) % len(RULE_COLORS)]
            shift = 0.015 * span * rng.standard_normal()
            x = r[key] * 10**shift if key == "lr" else r[key] + shift
            hollow = r["status"] == "stopped_early"
            ax.scatter(
                x,
                r[metric],
                marker=ROUTE_MARKERS.get(r["route"], "o"),
                facecolors="none" if hollow else color,
                edgecolors=color,
                s=40,
            )
        if key == "lr":
            ax.set_xscale("log")
        ax.set_xlabel(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"validation accuracy ({objective} labels)")
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], ls="", marker="o", color=RULE_COLORS[i % len(RULE_COLORS)], label=f"rule {rule}")
        for i, rule in enumerate(rules)
    ]
    handles += [Line2D([], [], ls="", marker=m, color="gray", label=route) for route, m in ROUTE_MARKERS.items()]
    handles += [Line2D([], [], ls="", marker="o", markerfacecolor="none", color="gray", label="stopped early")]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=9)
    fig.suptitle(f"raypipe sweep: {len(rows)} trials, objective after each trial's last epoch")
    return fig
