"""Per-class decisions: which samples a suspicion score flags, each given class judged against its own baseline."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from sklearn.mixture import GaussianMixture

from raypipe.core.detection._util import _rng


@dataclass
class ClassFlags:
    """The decision of `class_conditional_flags`.

    p_noisy:   float32 [N]; the mixture posterior (method="mixture"), else the hard decision as 0.0 / 1.0, so it
               drops into the partition's `p_noisy < tau` slot either way.
    flagged:   bool [N].
    per_class: one dict per class: n, decided_by ("class", "global" or "class_threshold") and why, and the
               fitted threshold or mixture; JSON-able, for the report.
    global_fit: the global decision every fallback uses (threshold or mixture parameters).
    """

    p_noisy: np.ndarray
    flagged: np.ndarray
    per_class: list[dict]
    global_fit: dict


def _fit_mixture_1d(s: np.ndarray, reg_covar: float, seed: int, max_rows: int) -> dict:
    """2-component 1-D Gaussian mixture on s; the 'high' component (larger mean) is the suspect one."""
    fit_rows = s
    if len(s) > max_rows:
        fit_rows = _rng(seed, "mixture_rows").choice(s, size=max_rows, replace=False)
    gm = GaussianMixture(2, covariance_type="full", reg_covar=reg_covar, random_state=seed, n_init=1)
    gm.fit(fit_rows.reshape(-1, 1))
    means = gm.means_.ravel()
    stds = np.sqrt(gm.covariances_.ravel())
    hi = int(np.argmax(means))
    lo = 1 - hi
    # Ashman's D: > 2 is needed for a clean separation of two Gaussians.
    d = math.sqrt(2.0) * abs(means[hi] - means[lo]) / math.sqrt(stds[hi] ** 2 + stds[lo] ** 2)
    return {
        "model": gm,
        "high": hi,
        "mean_low": float(means[lo]),
        "mean_high": float(means[hi]),
        "std_low": float(stds[lo]),
        "std_high": float(stds[hi]),
        "weight_high": float(gm.weights_[hi]),
        "ashman_d": float(d),
    }


def _posterior_high(fit: dict, s: np.ndarray) -> np.ndarray:
    return fit["model"].predict_proba(s.reshape(-1, 1))[:, fit["high"]]


def _public(fit: dict) -> dict:
    return {k: v for k, v in fit.items() if k not in ("model", "high")}


def class_conditional_flags(
    score: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    method: Literal["threshold", "mixture"] = "threshold",
    min_class_size: int = 20,
    min_separation: float = 2.0,
    min_gap_fraction: float = 0.5,
    tau: float = 0.5,
    max_flag_fraction: float | None = 0.5,
    max_fit_rows: int = 100_000,
    seed: int = 0,
) -> ClassFlags:
    """Flag suspect samples per GIVEN class, so that each class is judged against its own baseline.

    One global threshold fails under class-dependent noise (class a -> b flips): each given class has its own
    baseline score. score [N]: any suspicion score, higher = more suspect (1 - kNN agreement, loss, -AUM, a
    combined score); labels [N]: given labels. Methods:

    - "threshold" (confident learning's per-class threshold, Northcutt et al. 2021): flag a sample whose score
      is above the mean score of its class.
    - "mixture": a 2-component 1-D Gaussian mixture per class; p_noisy = posterior of the higher-mean component,
      flagged = p_noisy > tau. A class's own fit is used only when it is two populations: Ashman's D >=
      min_separation and a gap between the means >= min_gap_fraction x the global mixture's gap.

    A class without its own estimate (fewer than min_class_size samples, all scores equal, or for "mixture" one
    population) falls back to the same rule fitted over all samples; a fallback that would flag more than
    max_flag_fraction of the class uses the class-mean threshold instead (each class is assumed majority-correct;
    None disables this). per_class[c]["decided_by"] says which rule decided: "class", "global" or
    "class_threshold". docs/detection.md has the reasoning and the measurements.
    """
    score = np.asarray(score, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    n = len(score)
    if labels.shape != (n,):
        raise ValueError(f"score [N] and labels [N] disagree: {score.shape} vs {labels.shape}")
    if n == 0:
        raise ValueError("no samples to flag")
    if not np.all(np.isfinite(score)):
        raise ValueError("score has NaN or inf values")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes})")
    members = [np.flatnonzero(labels == c) for c in range(num_classes)]
    if method == "threshold":
        return _threshold_flags(score, members, min_class_size, max_flag_fraction)
    if method != "mixture":
        raise ValueError(f"method must be 'threshold' or 'mixture', got {method!r}")
    return _mixture_flags(
        score,
        members,
        tau=tau,
        min_class_size=min_class_size,
        min_separation=min_separation,
        min_gap_fraction=min_gap_fraction,
        max_flag_fraction=max_flag_fraction,
        max_fit_rows=max_fit_rows,
        seed=seed,
    )


class _Decision:
    """p_noisy and flagged of every sample while the classes are decided one by one, from the global rule's."""

    def __init__(self, score: np.ndarray, p_global: np.ndarray, flag_global: np.ndarray, max_flag_fraction):
        self.score = score
        self.p_global, self.flag_global = p_global, flag_global
        self.p_noisy, self.flagged = p_global.copy(), flag_global.copy()  # float64 [N], bool [N]
        self.max_flag_fraction = max_flag_fraction

    def class_mean_threshold(self, idx: np.ndarray) -> float:
        """Flag the class's samples scored above the class mean (confident learning's per-class threshold)."""
        t_c = float(self.score[idx].mean())
        self.flagged[idx] = self.score[idx] > t_c
        self.p_noisy[idx] = self.flagged[idx]
        return t_c

    def fallback(self, idx: np.ndarray, info: dict, reason: str) -> None:
        """The global rule decides this class, unless it would flag more than max_flag_fraction of it.

        Each given class is assumed majority-correct (the usual identifiability assumption), so a class the global
        rule finds suspect en bloc has a high baseline (both classes of a swapped pair, a hard class, a source
        class): then only its more suspect part is flagged, by the class's own mean.
        """
        share = float(self.flag_global[idx].mean()) if len(idx) else 0.0
        info.update(decided_by="global", reason=reason, global_flag_share=share)
        if self.max_flag_fraction is not None and share > self.max_flag_fraction:
            t_c = self.class_mean_threshold(idx)
            info.update(decided_by="class_threshold", threshold=t_c)
            info["reason"] = f"{reason}; the global rule would flag {share:.0%} of it: class-mean threshold instead"
        else:
            self.flagged[idx], self.p_noisy[idx] = self.flag_global[idx], self.p_global[idx]

    def result(self, per_class: list[dict], global_fit: dict) -> ClassFlags:
        return ClassFlags(self.p_noisy.astype(np.float32), self.flagged, per_class, global_fit)


def _no_class_estimate(class_score: np.ndarray, min_class_size: int) -> str | None:
    """Why a class's own scores cannot decide it (too few, or all equal: no within-class evidence), else None."""
    if len(class_score) < min_class_size:
        return "too few samples"
    if np.ptp(class_score) == 0:
        return "all scores equal"
    return None


def _threshold_flags(
    score: np.ndarray, members: list[np.ndarray], min_class_size: int, max_flag_fraction: float | None
) -> ClassFlags:
    """method="threshold": flag a sample scored above its class's mean; the global rule is the overall mean."""
    global_t = float(score.mean())
    flag_global = score > global_t
    decision = _Decision(score, flag_global.astype(np.float64), flag_global, max_flag_fraction)
    per_class: list[dict] = []
    for c, idx in enumerate(members):
        info: dict = {"class": c, "n": len(idx)}
        reason = _no_class_estimate(score[idx], min_class_size)
        if reason is None:
            info.update(decided_by="class", threshold=decision.class_mean_threshold(idx))
        else:
            decision.fallback(idx, info, reason)
        per_class.append(info)
    return decision.result(per_class, {"threshold": global_t})


def _one_population(fit: dict, global_gap: float, min_separation: float, min_gap_fraction: float) -> str | None:
    """Why a class's 2-component fit is not two populations (too little separation or gap), else None."""
    if fit["ashman_d"] < min_separation:
        return f"one population (Ashman D {fit['ashman_d']:.2f})"
    gap = fit["mean_high"] - fit["mean_low"]
    if gap < min_gap_fraction * global_gap:
        return f"gap {gap:.3g} < {min_gap_fraction} x global gap {global_gap:.3g}"
    return None


def _mixture_flags(
    score: np.ndarray,
    members: list[np.ndarray],
    *,
    tau: float,
    min_class_size: int,
    min_separation: float,
    min_gap_fraction: float,
    max_flag_fraction: float | None,
    max_fit_rows: int,
    seed: int,
) -> ClassFlags:
    """method="mixture": a class's own 2-component mixture where it is two populations, else the global one's."""
    var = float(score.var())
    if var == 0:  # nothing distinguishes any sample: flag none
        p = np.zeros(len(score), dtype=np.float32)
        info_all = [
            {"class": c, "n": len(i), "decided_by": "global", "reason": "all scores equal"}
            for c, i in enumerate(members)
        ]
        return ClassFlags(p, p > tau, info_all, {"degenerate": True})
    # Variance floor (3% of the global std): kNN agreement takes only k + 1 values, and a component collapsing
    # onto one value would otherwise win every likelihood comparison.
    reg = 1e-3 * var
    global_fit = _fit_mixture_1d(score, reg, seed, max_fit_rows)
    p_global = _posterior_high(global_fit, score)
    decision = _Decision(score, p_global, p_global > tau, max_flag_fraction)
    global_gap = global_fit["mean_high"] - global_fit["mean_low"]
    per_class: list[dict] = []
    for c, idx in enumerate(members):
        info: dict = {"class": c, "n": len(idx)}
        reason = _no_class_estimate(score[idx], min_class_size)
        if reason is None:
            fit = _fit_mixture_1d(score[idx], reg, seed, max_fit_rows)
            info["mixture"] = _public(fit)
            reason = _one_population(fit, global_gap, min_separation, min_gap_fraction)
        if reason is None:
            decision.p_noisy[idx] = _posterior_high(fit, score[idx])
            decision.flagged[idx] = decision.p_noisy[idx] > tau
            info["decided_by"] = "class"
        else:
            decision.fallback(idx, info, reason)
        per_class.append(info)
    return decision.result(per_class, _public(global_fit))
