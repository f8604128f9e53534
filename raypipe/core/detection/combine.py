"""Choosing or combining suspicion scores without ground truth."""

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
    second component (reported only: measured, it preferred a partly memorized model's final loss, AUROC 0.73,
    over kNN disagreement, 0.97); weight_high = the share of the higher component.
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

    signals: name -> suspicion score [N] (higher = more suspect: 1 - agreement, loss, early loss, -AUM, ...).
    Every signal is first mapped by `normalize_signal` (monotone: skew removed, standardized). Then:

    1. Consensus (>= 3 signals): fit a one-factor model to the signals' Spearman correlations
       (`one_factor_loadings`). Detectors of the same hidden noisy/clean variable correlate through it, a signal
       blind to it correlates with nothing; signals with loading < min_loading are dropped. If fewer than two
       load (only one signal sees the noise, or none), there is no consensus and every signal stays in step 3.
    2. If >= 3 signals remain: the combined score is their factor-score mean, weights lambda / (1 - lambda^2)
       (loading over unique variance, floored at 0.05): better detectors count more.
    3. Otherwise (two remain, fewer than 3 were given, or no consensus): candidates are each remaining signal
       and, for exactly two, their mean; the one whose 2-component 1-D mixture is the most separated (largest Ashman D,
       `signal_separation`) wins, ties to fewer signals: a signal that sees the noise splits the samples into a
       clean bulk and a suspect group, one blind to it looks like one population.

    The returned score is on the normalized scale (higher = more suspect), where a 2-component mixture or
    `class_conditional_flags` can run.

    Limits (state them in any report): the consensus assumes the signals err independently; two signals
    that share a nuisance (e.g. the converged loss and AUM both reward 'hard' samples, early loss and AUM come
    from one trajectory) build a factor of their own, and a nuisance shared by most signals wins. Separation
    rewards ANY two-group structure (a partly memorized model's final loss is bimodal: memorized vs not yet;
    uniform noise has Ashman D ~3), so with two signals it is a weak tie-break; neither step can tell which end
    is noisy (the caller's sign convention does), and a very low noise rate barely moves either criterion.
    """
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
    separation = {name: signal_separation(normalized[name], max_fit_rows, seed) for name in names}

    from scipy.stats import rankdata

    rows = np.arange(n)
    if n > 5 * max_fit_rows:
        rows = _rng(seed, "correlation_rows").choice(n, size=5 * max_fit_rows, replace=False)
    pairwise: dict[str, float] = {}
    loadings: dict[str, float] = {}
    kept = names
    if len(names) >= 2:
        ranks = np.stack([rankdata(normalized[nm][rows]) for nm in names])  # [S, n]
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = np.nan_to_num(np.corrcoef(ranks))  # Spearman; a constant signal correlates with nothing
        for i, a in enumerate(names):
            for j in range(i + 1, len(names)):
                pairwise[f"{a}~{names[j]}"] = float(corr[i, j])
        if len(names) >= 3:
            lam = one_factor_loadings(corr)
            loadings = {nm: float(v) for nm, v in zip(names, lam, strict=True)}
            kept = [nm for nm in names if loadings[nm] >= min_loading]
            if len(kept) < 2:  # a consensus of one is none: the loadings are then fitted to noise correlations
                kept = names

    weights: dict[str, float]
    if len(kept) >= 3 and loadings and kept is not names:
        lam = np.array([loadings[nm] for nm in kept])
        w = lam / np.maximum(1.0 - lam**2, 0.05)
        weights = {nm: float(v / w.sum()) for nm, v in zip(kept, w, strict=True)}
        z = sum(weights[nm] * normalized[nm] for nm in kept)
        rule = "consensus"
        why = f"{len(kept)} signals share one factor (loading >= {min_loading}); factor-score weighted mean"
        chosen_sep = signal_separation(z, max_fit_rows, seed)
    else:
        candidates: dict[tuple[str, ...], dict] = {(nm,): separation[nm] for nm in kept}
        if len(kept) == 2:
            pair_mean = (normalized[kept[0]] + normalized[kept[1]]) / 2
            candidates[tuple(kept)] = signal_separation(pair_mean, max_fit_rows, seed)
        best = max(candidates, key=lambda cb: (round(candidates[cb]["ashman_d"], 6), -len(cb)))
        weights = {nm: 1.0 / len(best) for nm in best}
        z = np.mean([normalized[nm] for nm in best], axis=0)
        rule = "separation"
        chosen_sep = candidates[best]
        dropped = [nm for nm in names if nm not in kept]
        why = (
            f"{'+'.join(best)} has the most separated 2-component mixture (Ashman D {chosen_sep['ashman_d']:.2f})"
            f" among {len(candidates)} candidates"
            + (f"; dropped for low consensus loading: {dropped}" if dropped else "")
        )
    info = {
        "chosen": list(weights),
        "weights": weights,
        "rule": rule,
        "why": why,
        "loadings": loadings,
        "separation": separation,
        "chosen_separation": chosen_sep,
        "pairwise_spearman": pairwise,
    }
    return np.asarray(z, dtype=np.float32), info
