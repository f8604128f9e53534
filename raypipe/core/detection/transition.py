"""The noise transition matrix, estimated without ground truth, and the per-class quotas it implies.

T[i, j] = P(given label j | true class i); prior[i] = P(true class i). Under class-dependent noise (annotators
confuse similar classes) T is far from symmetric, and each given class holds its own share of wrong labels:
quota[c] = P(label wrong | given c) = 1 - prior[c] T[c, c] / sum_i prior[i] T[i, c].

The estimate reads label consensus among nearest neighbours (clusterability, Zhu et al. ICML 2021): the samples
around a sample in a representation share its true class, and their given labels are independent draws from that
class's row of T. The label counts of every neighbourhood are then a mixture of multinomials, fitted by EM
(`estimate_transition`). (HOC's moment matching on a sample and its two nearest neighbours was tried first and
dropped: on planted 40% class-pair swaps, docs/detection.md.) Arrays in, arrays out.
"""

from __future__ import annotations

import numpy as np


def estimate_transition(
    counts: np.ndarray,
    num_classes: int | None = None,
    init_diagonal: float = 0.8,
    max_iterations: int = 200,
    tol: float = 1e-7,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(T [C, C], prior [C], posterior [N, C], info) from neighbourhood label counts, by EM.

    counts [N, C]: how many of the labels around sample n (its own and its k nearest neighbours') are each class.
    Model (clusterability, Zhu et al. 2021): the samples around n share n's true class i, and their given labels
    are independent draws from row i of T, so counts[n] ~ Multinomial(m_n, T[i]) with i ~ prior: a latent class
    model (Dawid and Skene 1979, with the neighbours as annotators), fitted by EM from T = init_diagonal on the
    diagonal (rest even) and a uniform prior; the start picks the solution whose rows are dominated by their own
    class. posterior[n, i] = P(true class i | counts[n]). info: iterations, final mean log-likelihood.
    """
    x = np.asarray(counts, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"counts must be a non-empty [N, C] array, got shape {x.shape}")
    c = x.shape[1] if num_classes is None else int(num_classes)
    if x.shape[1] != c or np.any(x < 0):
        raise ValueError(f"counts must be non-negative with {c} columns, got shape {x.shape}")
    t = np.full((c, c), (1.0 - init_diagonal) / max(c - 1, 1))
    np.fill_diagonal(t, init_diagonal)
    prior = np.full(c, 1.0 / c)
    previous, iterations = -np.inf, 0
    while iterations < max_iterations:
        iterations += 1
        posterior, log_likelihood = class_posterior(x, t, prior)
        prior = np.maximum(posterior.mean(axis=0), 1e-12)
        mass = posterior.T @ x  # [C, C]: expected labels of each class around samples of each true class
        rows = mass.sum(axis=1, keepdims=True)
        t = np.where(rows > 0, mass / np.maximum(rows, 1e-300), np.eye(c))
        if log_likelihood - previous < tol * abs(log_likelihood):
            break
        previous = log_likelihood
    return t, prior / prior.sum(), posterior, {"iterations": iterations, "mean_log_likelihood": log_likelihood}


def class_posterior(counts: np.ndarray, t: np.ndarray, prior: np.ndarray) -> tuple[np.ndarray, float]:
    """(posterior [N, C], mean log-likelihood): P(true class i | counts[n]) under counts[n] ~ Multinomial(T[i]),
    i ~ prior (the E-step of `estimate_transition`), computed in log space."""
    x = np.asarray(counts, dtype=np.float64)
    log_joint = np.log(np.maximum(prior, 1e-300)) + x @ np.log(np.maximum(t, 1e-300)).T  # [N, C]
    top = log_joint.max(axis=1, keepdims=True)
    weights = np.exp(log_joint - top)
    total = weights.sum(axis=1, keepdims=True)
    return weights / total, float((top + np.log(total)).mean())


def neighbourhood_noise_posterior(
    labels: np.ndarray, neighbour_counts: np.ndarray, t: np.ndarray, prior: np.ndarray
) -> np.ndarray:
    """float64 [N]: P(label wrong | the neighbours' labels, given label) under the latent class model of
    `estimate_transition`: the neighbours' label counts [N, C] (the sample's own label left out: it is what is
    judged) give the posterior of the neighbourhood's true class, and Bayes with T turns it and the given label into
    the chance the label is wrong (`corruption_posterior`). Unlike neighbour agreement, it knows which classes can
    produce a given label: under cyclic flips a boot labelled T-shirt among boots labelled 60% boot / 40% T-shirt is
    wrong for sure, while its agreement (0.4) looks like any ambiguous sample's."""
    posterior, _ = class_posterior(neighbour_counts, t, prior)
    return corruption_posterior(posterior, t, labels)


def noisy_share_per_given_class(t: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """float64 [C]: P(label wrong | given label c) = 1 - prior[c] T[c, c] / sum_i prior[i] T[i, c] (Bayes), the
    share of given class c to flag. (Not 1 - T[c, c]: a class that receives flips from another grows, and its wrong
    labels are the received ones, not its own.)"""
    t = np.asarray(t, dtype=np.float64)
    prior = np.asarray(prior, dtype=np.float64)
    given = prior @ t  # [C] P(given c)
    keep = prior * np.diag(t)
    return np.where(given > 0, 1.0 - keep / np.maximum(given, 1e-300), 0.0).clip(0.0, 1.0)


def corruption_posterior(probs: np.ndarray, t: np.ndarray, given: np.ndarray) -> np.ndarray:
    """float64 [N]: P(label wrong | x, given label) by Bayes, from class probabilities probs [N, C] = P(true class
    | x) and T [C, C]: 1 - probs[n, g] T[g, g] / sum_i probs[n, i] T[i, g] with g the given label. The best any
    detector can do with these probabilities (flag where it is >= 0.5); with probabilities from a model trained on
    the true labels and the true T it is the detection ceiling the benchmarks quote."""
    probs = np.asarray(probs, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    given = np.asarray(given, dtype=np.int64)
    joint = probs * t[:, given].T  # [N, C]: P(true i | x) P(given g_n | true i)
    total = joint.sum(axis=1)
    keep = joint[np.arange(len(given)), given]
    return np.where(total > 0, 1.0 - keep / np.maximum(total, 1e-300), 0.0).clip(0.0, 1.0)


def noise_structure(t: np.ndarray, prior: np.ndarray, min_concentration: float = 0.5) -> dict:
    """Is the noise of T class-dependent? -> JSON-able dict.

    concentration: over the rows' wrong-label mass (weighted by prior[i] (1 - T[i, i])), the share that goes to each
    row's single most frequent wrong class: 1 / (C - 1) when wrong labels are spread evenly (symmetric noise), 1
    when every class is confused with one other (class pairs, cyclic flips). class_dependent = concentration >=
    min_concentration. Also the noise rate of every true class (1 - T[i, i]) and overall.
    """
    t = np.asarray(t, dtype=np.float64)
    prior = np.asarray(prior, dtype=np.float64)
    c = len(t)
    off = t - np.diag(np.diag(t))
    rate = 1.0 - np.diag(t)  # [C]
    mass = prior * rate
    top = off.max(axis=1)
    concentration = float((prior * top).sum() / mass.sum()) if mass.sum() > 0 else 0.0
    return {
        "concentration": concentration,
        "concentration_if_uniform": 1.0 / max(c - 1, 1),
        "min_concentration": min_concentration,
        "class_dependent": bool(concentration >= min_concentration),
        "noise_rate": float(mass.sum()),
        "noise_rate_per_class": rate.tolist(),
    }


def quota_flags(score: np.ndarray, labels: np.ndarray, quota: np.ndarray) -> np.ndarray:
    """bool [N]: within each given class c, the round(quota[c] * n_c) samples with the highest score (ties broken
    by position, deterministically). score [N] higher = more suspect; labels [N]; quota [C] in [0, 1]."""
    score = np.asarray(score, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    quota = np.asarray(quota, dtype=np.float64)
    if score.shape != labels.shape:
        raise ValueError(f"score [N] and labels [N] disagree: {score.shape} vs {labels.shape}")
    if np.any((quota < 0) | (quota > 1)):
        raise ValueError("quotas must lie in [0, 1]")
    flagged = np.zeros(len(score), dtype=bool)
    for c, q in enumerate(quota):
        idx = np.flatnonzero(labels == c)
        n_flag = int(round(q * len(idx)))
        if n_flag:
            order = np.argsort(-score[idx], kind="stable")
            flagged[idx[order[:n_flag]]] = True
    return flagged


def transition_error(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Mean absolute difference of two [C, C] transition matrices (the benchmark's T-hat error)."""
    estimate, truth = np.asarray(estimate, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if estimate.shape != truth.shape:
        raise ValueError(f"shapes differ: {estimate.shape} vs {truth.shape}")
    return float(np.abs(estimate - truth).mean())


def empirical_transition(true_label: np.ndarray, given_label: np.ndarray, num_classes: int) -> np.ndarray:
    """The true T [C, C] of a corrupted data set from its ground truth (rows: true class; a class without samples
    gets the identity row). For scoring and plots only."""
    c = int(num_classes)
    counts = np.zeros((c, c))
    np.add.at(counts, (np.asarray(true_label, dtype=np.int64), np.asarray(given_label, dtype=np.int64)), 1.0)
    rows = counts.sum(axis=1, keepdims=True)
    return np.where(rows > 0, counts / np.maximum(rows, 1), np.eye(c))


def estimate_from_neighbours(
    labels: np.ndarray, neighbour_counts: np.ndarray, num_classes: int, min_concentration: float = 0.5
) -> dict:
    """The noise transition estimate from each sample's given label and its k nearest neighbours' label counts
    [N, C] -> JSON-able dict: estimate T [C][C], prior [C], noisy_share [C] (`noisy_share_per_given_class`),
    quota [C] (noisy_share capped by `plurality_cap`), structure (`noise_structure`), fit (EM's iterations and
    log-likelihood)."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.asarray(neighbour_counts, dtype=np.float64).copy()
    counts[np.arange(len(labels)), labels] += 1.0  # the sample's own label is one more draw of its class's row
    t, prior, _, fit = estimate_transition(counts, num_classes)
    share = noisy_share_per_given_class(t, prior)
    structure = noise_structure(t, prior, min_concentration)
    return {
        "estimate": t.tolist(),
        "prior": prior.tolist(),
        "noisy_share": share.tolist(),
        "quota": np.minimum(share, plurality_cap(structure["concentration"])).tolist(),
        "structure": structure,
        "fit": fit,
    }


def plurality_cap(concentration: float) -> float:
    """The largest share of wrong labels a given class can hold and still be mostly its own class (the usual
    identifiability condition: P(true c | given c) >= P(true j | given c) for every j): with a share q wrong, of
    which a fraction `concentration` comes from one other class, 1 - q >= concentration * q, so q <= 1 / (1 +
    concentration): 0.5 when wrong labels come from one class (pairs), 0.9 for symmetric noise over 10 classes.
    Where two classes overlap in the representation, the neighbourhood estimate merges them and hands one of them
    nearly all the wrong labels (Fashion-MNIST pairs: 0.80-0.95 for a class whose true share is 0.40); the cap
    keeps the quota within what the assumption allows."""
    return 1.0 / (1.0 + max(float(concentration), 0.0))
