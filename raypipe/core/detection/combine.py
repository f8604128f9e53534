"""Choosing or combining suspicion scores without ground truth.

Each score is first made monotonically as-Gaussian-as-possible (`normalize_signal`); then signals that agree
with each other (a one-factor model of their rank correlations) are averaged, or else the one whose scores split
most clearly into two groups is chosen (`combine_signals`).
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.mixture import GaussianMixture

from raypipe.core.detection._util import _rng
from raypipe.core.detection.decide import _fit_mixture_1d


def normalize_signal(score: np.ndarray) -> np.ndarray:
    """A monotone map of a suspicion score to a standardized, as-Gaussian-as-possible scale (float64 [N]).

    Robust standardization ((s - median) / IQR, so heavy tails do not set the scale) then a Yeo-Johnson power
    transform with its maximum-likelihood lambda, standardized. The power transform removes skew (a memorized
    loss: a spike near 0 and a long tail), which a 2-component mixture would otherwise read as two groups;
    it cannot remove real bimodality, which is what `signal_separation` then measures.
    """
    from sklearn.preprocessing import PowerTransformer

    s = np.asarray(score, dtype=np.float64)
    med = np.median(s)
    q25, q75 = np.percentile(s, [25, 75])
    scale = q75 - q25
    if scale <= 0:
        scale = s.std()
    if scale <= 0:
        return np.zeros_like(s)
    z = (s - med) / scale
    z = PowerTransformer(method="yeo-johnson", standardize=True).fit_transform(z.reshape(-1, 1)).ravel()
    return z


def signal_separation(z: np.ndarray, max_fit_rows: int = 20_000, seed: int = 0) -> dict:
    """Label-free separation of a normalized score by a 2-component 1-D Gaussian mixture (on <= max_fit_rows rows).

    ashman_d = sqrt(2) |mu_1 - mu_2| / sqrt(s_1^2 + s_2^2) (> 2: two separated groups; ~1.4 for one Gaussian,
    ~3 for a uniform); delta_bic_per_sample = (BIC_1 - BIC_2) / n, the log-likelihood gain per sample of a
    second component (reported only, never used to choose: docs/detection.md); weight_high = the share of the
    higher component.
    """
    z = np.asarray(z, dtype=np.float64)
    if len(z) > max_fit_rows:
        z = _rng(seed, "separation_rows").choice(z, size=max_fit_rows, replace=False)
    if np.ptp(z) == 0:
        return {"delta_bic_per_sample": 0.0, "ashman_d": 0.0, "weight_high": 0.0}
    x = z.reshape(-1, 1)
    reg = 1e-3 * float(z.var())
    g1 = GaussianMixture(1, reg_covar=reg, random_state=seed).fit(x)
    fit = _fit_mixture_1d(z, reg, seed, max_fit_rows)
    delta = (g1.bic(x) - fit["model"].bic(x)) / len(z)
    return {"delta_bic_per_sample": float(delta), "ashman_d": fit["ashman_d"], "weight_high": fit["weight_high"]}


def one_factor_loadings(corr: np.ndarray, iters: int = 500, tol: float = 1e-9) -> np.ndarray:
    """Loadings [S] of a one-factor model fitted to a correlation matrix [S, S] (iterated principal axes).

    Finds lambda with corr[i, j] ~= lambda_i * lambda_j off the diagonal (the diagonal, i.e. each signal's own
    noise, is ignored): the rank-one structure that conditionally independent detectors of one hidden binary
    variable produce (the spectral meta-learner idea, Parisi et al. 2014, PNAS). Oriented so the loadings sum
    to >= 0; clipped to [-0.995, 0.995]. Identifiable only with >= 3 signals.
    """
    c = np.asarray(corr, dtype=np.float64)
    s = c.shape[0]
    off = np.abs(c - np.diag(np.diag(c)))
    lam = np.sqrt(off.max(axis=1)) if s > 1 else np.ones(1)
    for _ in range(iters):
        r = c.copy()
        np.fill_diagonal(r, lam**2)
        w, v = np.linalg.eigh(r)
        new = v[:, -1] * math.sqrt(max(w[-1], 0.0))
        if new.sum() < 0:
            new = -new
        new = np.clip(new, -0.995, 0.995)
        done = np.max(np.abs(new - lam)) < tol
        lam = new
        if done:
            break
    return lam


def combine_signals(
    signals: dict[str, np.ndarray],
    min_loading: float = 0.3,
    max_fit_rows: int = 20_000,
    seed: int = 0,
) -> tuple[np.ndarray, dict]:
    """Choose or combine suspicion scores without ground truth. -> (score float32 [N], signals_used dict).

    signals: name -> suspicion score [N] (higher = more suspect: 1 - agreement, loss, early loss, -AUM, ...),
    each first mapped by `normalize_signal`. With >= 3 signals, a one-factor model of their Spearman
    correlations (`one_factor_loadings`) finds the ones that detect the same hidden clean / noisy variable
    (loading >= min_loading); if >= 3 load, the score is their factor-score weighted mean ("consensus").
    Otherwise each remaining signal (and, for exactly two, their mean) is a candidate and the one whose
    2-component mixture is the most separated (`signal_separation`) wins ("separation"). The score is on the
    normalized scale. docs/detection.md explains both steps and their limits, which belong in any report.
    """
    normalized = _normalized_signals(signals)
    names = list(normalized)
    separation = {name: signal_separation(normalized[name], max_fit_rows, seed) for name in names}
    pairwise, loadings, loaded = _spearman_and_loadings(normalized, min_loading, max_fit_rows, seed)
    if loaded is not None and len(loaded) >= 3:
        z, choice = _consensus(normalized, loaded, loadings, min_loading, max_fit_rows, seed)
    else:
        kept = names if loaded is None else loaded
        dropped = [nm for nm in names if nm not in kept]
        z, choice = _most_separated(normalized, kept, dropped, separation, max_fit_rows, seed)
    info = {
        "chosen": list(choice["weights"]),
        "weights": choice["weights"],
        "rule": choice["rule"],
        "why": choice["why"],
        "loadings": loadings,
        "separation": separation,
        "chosen_separation": choice["chosen_separation"],
        "pairwise_spearman": pairwise,
    }
    return np.asarray(z, dtype=np.float32), info


def _normalized_signals(signals: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every signal checked (one shape, finite) and mapped by `normalize_signal`, in the given order."""
    if not signals:
        raise ValueError("no signals to combine")
    names = list(signals)
    n = len(np.asarray(signals[names[0]]))
    normalized: dict[str, np.ndarray] = {}
    for name in names:
        s = np.asarray(signals[name], dtype=np.float64)
        if s.shape != (n,):
            raise ValueError(f"signal {name!r} has shape {s.shape}, expected ({n},)")
        if not np.all(np.isfinite(s)):
            raise ValueError(f"signal {name!r} has NaN or inf values (e.g. samples the recorder never saw)")
        normalized[name] = normalize_signal(s)
    return normalized


def _spearman_and_loadings(
    normalized: dict[str, np.ndarray], min_loading: float, max_fit_rows: int, seed: int
) -> tuple[dict[str, float], dict[str, float], list[str] | None]:
    """(pairwise Spearman correlations, one-factor loadings, the signals loading >= min_loading).

    The loadings need >= 3 signals; the loaded list is None when there is no consensus (fewer than 3 signals, or
    fewer than two load: the loadings are then fitted to chance correlations).
    """
    from scipy.stats import rankdata

    names = list(normalized)
    n = len(normalized[names[0]])
    rows = np.arange(n)
    if n > 5 * max_fit_rows:
        rows = _rng(seed, "correlation_rows").choice(n, size=5 * max_fit_rows, replace=False)
    pairwise: dict[str, float] = {}
    loadings: dict[str, float] = {}
    if len(names) < 2:
        return pairwise, loadings, None
    ranks = np.stack([rankdata(normalized[nm][rows]) for nm in names])  # [S, n]
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.nan_to_num(np.corrcoef(ranks))  # Spearman; a constant signal correlates with nothing
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            pairwise[f"{a}~{names[j]}"] = float(corr[i, j])
    if len(names) < 3:
        return pairwise, loadings, None
    lam = one_factor_loadings(corr)
    loadings = {nm: float(v) for nm, v in zip(names, lam, strict=True)}
    loaded = [nm for nm in names if loadings[nm] >= min_loading]
    return pairwise, loadings, loaded if len(loaded) >= 2 else None


def _consensus(
    normalized: dict[str, np.ndarray],
    kept: list[str],
    loadings: dict[str, float],
    min_loading: float,
    max_fit_rows: int,
    seed: int,
) -> tuple[np.ndarray, dict]:
    """Factor-score weighted mean of the loaded signals: weight lambda / (1 - lambda^2), floored at 0.05."""
    lam = np.array([loadings[nm] for nm in kept])
    w = lam / np.maximum(1.0 - lam**2, 0.05)
    weights = {nm: float(v / w.sum()) for nm, v in zip(kept, w, strict=True)}
    z = sum(weights[nm] * normalized[nm] for nm in kept)
    why = f"{len(kept)} signals share one factor (loading >= {min_loading}); factor-score weighted mean"
    return z, {
        "weights": weights,
        "rule": "consensus",
        "why": why,
        "chosen_separation": signal_separation(z, max_fit_rows, seed),
    }


def _most_separated(
    normalized: dict[str, np.ndarray],
    kept: list[str],
    dropped: list[str],
    separation: dict[str, dict],
    max_fit_rows: int,
    seed: int,
) -> tuple[np.ndarray, dict]:
    """The candidate (each kept signal; for two, also their mean) with the largest Ashman D, ties to fewer."""
    candidates: dict[tuple[str, ...], dict] = {(nm,): separation[nm] for nm in kept}
    if len(kept) == 2:
        pair_mean = (normalized[kept[0]] + normalized[kept[1]]) / 2
        candidates[tuple(kept)] = signal_separation(pair_mean, max_fit_rows, seed)
    best = max(candidates, key=lambda cb: (round(candidates[cb]["ashman_d"], 6), -len(cb)))
    weights = {nm: 1.0 / len(best) for nm in best}
    z = np.mean([normalized[nm] for nm in best], axis=0)
    chosen_sep = candidates[best]
    why = (
        f"{'+'.join(best)} has the most separated 2-component mixture (Ashman D {chosen_sep['ashman_d']:.2f})"
        f" among {len(candidates)} candidates" + (f"; dropped for low consensus loading: {dropped}" if dropped else "")
    )
    return z, {"weights": weights, "rule": "separation", "why": why, "chosen_separation": chosen_sep}
