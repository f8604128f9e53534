"""report.json, report.md and plots from the stage manifests of a run.

Times: ``seconds_per_epoch`` is the training loop's; ``seconds_total`` is the whole wall time of a
route as a user pays it: for `initial` and `retrain` their training stage; for the repair routes
`l_ft` / `f_ft` / `relabel` attribution + partition + pruning + their fine-tuning (the paper compared seconds
per epoch only). A training stage's own seconds run from its start to its end on its workers, not
counting a wait for a free slot; routes that ran side by side (on Ray, each with its own workers)
are listed under ``routes_overlapped``, and the markdown says so.
"""

from __future__ import annotations

import math
from typing import Any

from raypipe import storage
from raypipe.config import FINE_TUNE_ROUTES, ROUTE_TITLES, ROUTES, Config
from raypipe.layout import RunLayout
from raypipe.report.choice import recommendation
from raypipe.report.plots import write_plots

# The stages a repair route pays for besides its own training (the retrain baseline pays none of them).
REPAIR_OVERHEAD = ("attribution", "partition", "prune")


def chance_level(data: dict[str, Any]) -> tuple[float, float]:
    """(chance accuracy on the test split, the accuracy at or below which a route counts as at chance).
    Chance is the larger of 1 / classes and the most common test class's share (what predicting that class
    alone scores); the threshold adds two standard errors of an accuracy measured on that many samples."""
    p = max(1.0 / data["num_classes"], float(data.get("test_majority_fraction", 0.0)))
    n = max(int(data["rows"]["test"]), 1)
    return p, p + 2.0 * math.sqrt(p * (1.0 - p) / n)


def chance_warnings(routes: dict[str, dict[str, Any]], data: dict[str, Any]) -> list[str]:
    """Flags every route at chance (`at_chance` in its summary) -> one warning line each."""
    chance, threshold = chance_level(data)
    warnings = []
    for route, summary in routes.items():
        summary["at_chance"] = bool(summary["accuracy"] <= threshold)
        if summary["at_chance"]:
            after = ", the partition's clean side and prune.fraction" if route in FINE_TUNE_ROUTES else ""
            warnings.append(
                f"{ROUTE_TITLES[route]} is at chance: test accuracy {summary['accuracy']:.3f}, and predicting the "
                f"most common class alone scores {chance:.3f} on {data['rows']['test']} samples; the model learned "
                f"nothing useful: check {route}.lr and {route}.epochs{after}"
            )
    return warnings


def build_report(config: Config, manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    stage_seconds = {name: m["seconds"] for name, m in manifests.items()}
    routes: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        if route not in manifests:
            continue
        summary = {k: v for k, v in manifests[route]["summary"].items() if k != "history"}
        overhead = sum(stage_seconds.get(s, 0.0) for s in REPAIR_OVERHEAD) if route in FINE_TUNE_ROUTES else 0.0
        own = manifests[route]["summary"].get("seconds_total", manifests[route]["seconds"])
        summary["seconds_overhead"] = overhead
        summary["seconds_total"] = own + overhead
        summary.setdefault("seconds_per_epoch", None)  # a given checkpoint has no epochs here
        routes[route] = summary
    part = manifests["partition"]["summary"]
    report: dict[str, Any] = {
        "routes": routes,
        "partition": {k: part[k] for k in ("n_clean", "n_noisy", "tau", "mixture")},
        "pruning": {k: manifests["prune"]["summary"][k] for k in ("n_pruned", "probe_width")},
        "attribution": {"rule": manifests["attribution"]["summary"]["rule"]},
        "data": manifests["data"]["summary"],
        # which labels every route's test accuracy is measured against (older runs: a clean test split)
        "accuracy_measured_against": manifests["data"]["summary"].get("test_labels", "clean labels"),
        "stages_seconds": stage_seconds,
        "routes_overlapped": overlapping_routes(manifests),
        "config": config.to_dict(),
    }
    report["detection"] = {
        **part.get("detection", {}),
        "signals_used": part.get("signals_used", {}),
        "transition_matrix": part.get("transition_matrix"),
    }
    report["warnings"] = chance_warnings(routes, report["data"])
    report["relabel"] = part.get("relabel")  # how right the suggested labels are, when ground truth exists
    report["validation_detection"] = part.get("validation")
    return report


def overlapping_routes(manifests: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """{route: the routes whose wall time overlapped its own} for the routes that overlapped any
    (from each training summary's `wall_interval`, [start, end] in Unix seconds)."""
    spans = {
        r: manifests[r]["summary"]["wall_interval"]
        for r in ROUTES
        if "wall_interval" in manifests.get(r, {}).get("summary", {})
    }
    out = {r: [o for o in spans if o != r and spans[o][0] < b and a < spans[o][1]] for r, (a, b) in spans.items()}
    return {r: others for r, others in out.items() if others}


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_markdown(report: dict[str, Any]) -> str:
    routes = report["routes"]
    cols = [r for r in ROUTES if r in routes]
    lines = ["# raypipe report", ""]
    if report.get("warnings"):
        lines += ["## Warnings", "", *(f"- **{w}**" for w in report["warnings"]), ""]
    data = report["data"]
    cfg = report["config"]
    truth = data.get("ground_truth", "injected noise")
    corrupted = f"{data['n_corrupted']} known corrupted, from {truth}" if truth else "ground truth unknown"
    lines += [
        f"Data: `{cfg['data']['source']}`, train {data['rows']['train']} ({corrupted}; "
        f"{data.get('noise_injected', cfg['noise']['kind'] + ' noise')}), test {data['rows']['test']}. "
        f"Model `{cfg['model']['name']}`, probe width {report['pruning']['probe_width']}. "
        f"Attribution rule `{report['attribution']['rule']}`.",
        "",
        "## Routes (test split; last epoch)",
        "",
        f"Every accuracy below is measured against {report.get('accuracy_measured_against', 'the test labels')}.",
        "",
        "| metric | " + " | ".join(ROUTE_TITLES[c] for c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for key, title, digits in [
        ("accuracy", "accuracy", 4),
        ("macro_precision", "macro precision", 4),
        ("macro_f1", "macro F1", 4),
        ("seconds_per_epoch", "seconds per epoch", 3),
        ("seconds_total", "total seconds", 2),
    ]:
        lines.append(f"| {title} | " + " | ".join(_fmt(routes[c].get(key), digits) for c in cols) + " |")
    lines += ["", "Total seconds of L-FT / F-FT / Relabel include attribution, partition and pruning.", ""]
    overlapped = report.get("routes_overlapped", {})
    if overlapped:
        names = ", ".join(ROUTE_TITLES[r] for r in ROUTES if r in overlapped)
        lines += [
            f"{names} ran side by side, each on workers of its own: each route's seconds are its own wall time, "
            "so they add up to more than the wall time the routes took together.",
            "",
        ]
    part = report["partition"]
    lines += [
        "## Partition",
        "",
        f"Clean {part['n_clean']}, noisy {part['n_noisy']} at tau = {part['tau']}; "
        f"pruned {report['pruning']['n_pruned']} of {report['pruning']['probe_width']} probe neurons.",
        "",
    ]
    lines += _choice_md(report)
    lines += _detection_md(report["detection"])
    if "auroc" in report["detection"]:
        det = report["detection"]
        lines += [
            "## Detection of the corrupted samples (ground truth used only to score)",
            "",
            "| precision | recall | F1 | AUROC |",
            "|---|---|---|---|",
            f"| {_fmt(det['precision'])} | {_fmt(det['recall'])} | {_fmt(det['f1'])} | {_fmt(det['auroc'])} |",
            "",
        ]
    lines += ["## Seconds per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {_fmt(sec, 2)} |" for name, sec in report["stages_seconds"].items()]
    for plot in report.get("plots", []):
        lines += ["", f"![{plot}]({plot})"]
    return "\n".join(lines) + "\n"


def _choice_md(report: dict[str, Any]) -> list[str]:
    """The recommended route and its evidence; how right the relabel route's labels are."""
    lines = []
    choice = report.get("recommended_route") or {}
    if choice.get("route"):
        evidence = ", ".join(f"{ROUTE_TITLES[r]} {s['accuracy']:.4f}" for r, s in choice["evidence"].items())
        cleaned = ", ".join(
            f"{ROUTE_TITLES[r]} {s['accuracy_cleaned']:.4f}" for r, s in choice["evidence"].items() if "n_cleaned" in s
        )
        lines += [
            "## Recommended route (chosen without the test split)",
            "",
            f"**{ROUTE_TITLES[choice['route']]}**: {choice['why']}. Accuracy on the validation split (given labels): "
            f"{evidence}.",
            "",
        ]
        if cleaned:
            lines += [
                f"On the validation samples detected as clean (evidence only: they favour the routes that agree with "
                f"the detector): {cleaned}.",
                "",
            ]
    relabel = report.get("relabel") or {}
    if "suggested_accuracy_flagged" in relabel:
        lines += [
            f"Suggested labels (ground truth used only to score): right on {relabel['suggested_accuracy_flagged']:.1%}"
            f" of the {relabel['n_flagged']} flagged samples; the relabel route took {relabel['n_relabelled']} of "
            f"them, {relabel['relabel_accuracy']:.1%} relabelled right.",
            "",
        ]
    return lines


def _detection_md(det: dict[str, Any]) -> list[str]:
    """Which signals decided, which were missing and why, which decision `auto` took and why, the noise estimate."""
    used = det.get("signals_used", {})
    if not used:
        return []
    chosen = ", ".join(used.get("chosen", [])) or "the attribution mixture"
    lines = [f"Detection signal: `{used.get('signal')}` (used: {chosen}; {used.get('why', '')}).", ""]
    if "decision_taken" in used:
        lines += [
            f"Decision: `{used['decision_taken']}` (detection.decision={used['decision']}): {used['decision_why']}.",
            "",
        ]
    for name, why in used.get("missing", {}).items():
        lines.append(f"- no `{name}` signal: {why}")
    if used.get("missing"):
        lines.append("")
    transition = det.get("transition_matrix")
    if transition:
        rates = ", ".join(f"{q:.2f}" for q in transition["quota"])
        noise_rate = transition["structure"]["noise_rate"]
        lines += [
            f"Estimated noise (from kNN label consensus in `{transition['space']}`): {noise_rate:.1%} "
            f"of the labels wrong; share wrong per given class: {rates}"
            + (f"; mean |T-hat - T| {transition['error']:.4f}" if "error" in transition else "")
            + ".",
            "",
        ]
    return lines


def write_report(run_layout: RunLayout, config: Config, manifests: dict[str, dict[str, Any]], log=print) -> dict:
    report = build_report(config, manifests)
    report["recommended_route"] = recommendation(run_layout, list(report["routes"]))
    report["plots"] = write_plots(run_layout, report, log)
    storage.write_json(run_layout.report_json, report)
    storage.write_bytes(run_layout.report_md, render_markdown(report).encode())
    log(f"[report] {run_layout.report_md}")
    for route, m in report["routes"].items():
        log(f"  {ROUTE_TITLES[route]:8s} accuracy {m['accuracy']:.4f}  macro F1 {m['macro_f1']:.4f}")
    choice = report["recommended_route"]
    if choice["route"] is not None:
        evidence = choice["evidence"][choice["route"]]
        log(
            f"[report] recommended route: {ROUTE_TITLES[choice['route']]} (accuracy {evidence['accuracy']:.4f} on the "
            f"{evidence['n']} validation samples, their given labels; the test split was not used)"
        )
    for warning in report["warnings"]:
        log(f"[report] warning: {warning}")
    return report


def remove_report(run_layout: RunLayout, log=print) -> None:
    """The report of a run whose stages are about to change would look current while they do (and after a
    failure): removed before the first stage is computed; the run writes a new one when it finishes."""
    old = storage.read_json_or_none(run_layout.report_json)
    plots = old.get("plots", []) if isinstance(old, dict) else []
    stale = [run_layout.report_json, run_layout.report_md, *(storage.join(run_layout.root, p) for p in plots)]
    found = [uri for uri in stale if storage.exists(uri)]
    for uri in found:
        storage.remove_tree(uri)
    if found:
        log("[run] a stage is computed again: removed the report of the previous results")
