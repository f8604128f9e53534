"""Per-sample attribution at the probe layer, one batch at a time. Plain torch, no Ray.

One forward pass through the backbone per batch; every rule below needs gradients only of the head
(probe -> logits), so they are computed in a batch with torch.func (vmap over samples) on the tiny
head, never with a Python loop over samples or one backward pass per class through the backbone.

Rules, for a sample x with given label y, probe h = h(x) (pre-ReLU, [d]) and logits z ([C]):
- grad_x_act_maxclass (the paper): A_j = | max_c  dz_c/dh_j * h_j |             -> [d]
- grad_x_act_label:                A_j = | dCE(z, y)/dh_j * h_j |                 -> [d]
- loss:                            CE(z, y)                                       -> [1]
- last_layer_grad:                 dCE(z, y)/d(fc2.weight, fc2.bias), flattened  -> [C*d + C]
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jacrev, vmap

from raypipe.core.models import ProbedModel

RuleFn = Callable[[ProbedModel, torch.Tensor, torch.Tensor], torch.Tensor]


def _grad_x_act_maxclass(model: ProbedModel, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    def logits_one(h_one: torch.Tensor) -> torch.Tensor:  # [d] -> [C]
        return model.head_from_probe(h_one.unsqueeze(0)).squeeze(0)

    jac = vmap(jacrev(logits_one))(h)  # [B, C, d]: dz_c / dh_j
    return (jac * h.unsqueeze(1)).amax(dim=1).abs()  # max over classes, then |.|  -> [B, d]


def _loss_one(model: ProbedModel) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def loss_one(h_one: torch.Tensor, y_one: torch.Tensor) -> torch.Tensor:
        logits = model.head_from_probe(h_one.unsqueeze(0))
        return F.cross_entropy(logits, y_one.unsqueeze(0))

    return loss_one


def _grad_x_act_label(model: ProbedModel, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    g = vmap(grad(_loss_one(model)))(h, y)  # [B, d]: dCE(z, y) / dh
    return (g * h).abs()


def _loss(model: ProbedModel, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model.head_from_probe(h)
    return F.cross_entropy(logits, y, reduction="none").unsqueeze(1)  # [B, 1]


def _last_layer_grad(model: ProbedModel, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    params = {k: v.detach() for k, v in model.fc2.named_parameters()}
    relu_h = F.relu(h)

    def loss_one(p: dict[str, torch.Tensor], a_one: torch.Tensor, y_one: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model.fc2, p, (a_one.unsqueeze(0),))
        return F.cross_entropy(logits, y_one.unsqueeze(0))

    g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, relu_h, y)
    return torch.cat([g["weight"].flatten(1), g["bias"]], dim=1)  # [B, C*d + C]


RULES: dict[str, RuleFn] = {
    "grad_x_act_maxclass": _grad_x_act_maxclass,
    "grad_x_act_label": _grad_x_act_label,
    "loss": _loss,
    "last_layer_grad": _last_layer_grad,
}


def attribute_batch(
    model: ProbedModel,
    batch: dict[str, np.ndarray],
    rule: str,
    device: torch.device | str = "cpu",
    keep_features: bool = False,
) -> dict[str, np.ndarray]:
    """One batch of samples -> one row per sample of everything later stages need.

    `batch` holds sample_id [B], x [B, *shape], label [B] (and optionally true_label, is_corrupted,
    passed through for scoring only). The model must be in eval mode on `device`. `keep_features`
    adds `features` [B, F], the backbone's output (the head's input, what L-FT trains the head on).
    """
    x = torch.tensor(batch["x"], dtype=torch.float32, device=device)  # a copy: Arrow buffers are read-only
    y = torch.tensor(batch["label"], dtype=torch.long, device=device)
    with torch.no_grad():
        features = model.features(x)  # [B, F], the backbone's only pass
        h = model.probe(features)  # [B, d] pre-ReLU probe activations
    attribution = RULES[rule](model, h, y).detach()
    with torch.no_grad():
        logits = model.head_from_probe(h)  # [B, C]
        prob = logits.softmax(dim=1)
        loss = F.cross_entropy(logits, y, reduction="none")
        pred_prob, pred_label = prob.max(dim=1)
        given_prob = prob.gather(1, y.unsqueeze(1)).squeeze(1)
        best_other = prob.scatter(1, y.unsqueeze(1), -1.0).argmax(dim=1)  # the likeliest class besides the given one
    out = {
        "sample_id": np.asarray(batch["sample_id"], dtype=np.int64),
        "label": y.cpu().numpy(),
        "pred_label": pred_label.cpu().numpy().astype(np.int64),
        "pred_prob": pred_prob.cpu().numpy().astype(np.float32),
        "given_prob": given_prob.cpu().numpy().astype(np.float32),
        "best_other_label": best_other.cpu().numpy().astype(np.int64),
        "loss": loss.cpu().numpy().astype(np.float32),
        "probe": h.cpu().numpy().astype(np.float32),
        "attribution": attribution.cpu().numpy().astype(np.float32),
    }
    for key in ("true_label", "is_corrupted"):
        if key in batch:
            out[key] = np.asarray(batch[key])
    if keep_features:
        out["features"] = features.cpu().numpy().astype(np.float32)
    return out


def reference_attribution(model: ProbedModel, x: torch.Tensor, y: torch.Tensor, rule: str) -> torch.Tensor:
    """The slow obvious version: one sample and one backward pass per class at a time.

    For tests and the attribution-cost benchmark only (this is how the published code computes it).
    """
    rows = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        h = model.probe(model.features(xi)).detach().requires_grad_(True)  # [1, d]
        logits = model.head_from_probe(h)
        if rule == "grad_x_act_maxclass":
            per_class = []
            for c in range(logits.shape[1]):
                (g,) = torch.autograd.grad(logits[0, c], h, retain_graph=True)
                per_class.append(g[0] * h[0])
            rows.append(torch.stack(per_class).amax(dim=0).abs())
        elif rule == "grad_x_act_label":
            (g,) = torch.autograd.grad(F.cross_entropy(logits, y[i : i + 1]), h)
            rows.append((g[0] * h[0]).abs())
        elif rule == "loss":
            rows.append(F.cross_entropy(logits, y[i : i + 1]).reshape(1))
        elif rule == "last_layer_grad":
            model.zero_grad()
            F.cross_entropy(logits, y[i : i + 1]).backward()
            rows.append(torch.cat([model.fc2.weight.grad.flatten(), model.fc2.bias.grad]).clone())
        else:
            raise ValueError(rule)
    return torch.stack(rows).detach()
