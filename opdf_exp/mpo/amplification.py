"""How much further one optimizer step moves an MPO layer's dense weight than it moves the same dense weight.

Why it matters: an MPO layer's W is a product of n local tensors, and Adam moves every tensor by about the
learning rate per entry, so W moves by the sum of n such products: at the same nominal rate an MPO student takes
a larger step than its dense twin (measured on a 3-block MiniLM student: 1.8x at n = 2 up to 6.6x at n = 7). A
comparison of OPDF against KD at one learning rate then also compares two step sizes. ``decomposition.lr_scale=
auto`` divides the MPO tensors' rate by the ratio measured here, on the job's own first batch.
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn as nn

from opdf_exp.errors import ConfigError
from opdf_exp.mpo.surgery import export_dense, mpo_layers


def _one_adam_step(model: nn.Module, compute_loss: Callable[[nn.Module], torch.Tensor], lr: float,
                   betas: tuple[float, float], eps: float, weights: Callable[[nn.Module], dict[str, torch.Tensor]],
                   seed: int) -> dict[str, torch.Tensor]:
    """The change of each named dense weight after one Adam step of ``model`` on ``compute_loss``."""
    before = weights(model)
    params = [p for p in model.parameters() if p.requires_grad]
    for param in params:
        param.grad = None
    devices = [p.device for p in params if p.device.type == "cuda"][:1]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)  # the same dropout masks for both forms
        loss = compute_loss(model)
    loss.backward()
    torch.optim.Adam(params, lr=lr, betas=betas, eps=eps).step()
    after = weights(model)
    return {name: after[name] - before[name] for name in before}


def step_amplification(model: nn.Module, compute_loss: Callable[[nn.Module], torch.Tensor], lr: float = 1e-4,
                       betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, seed: int = 0) -> float:
    """||dW|| over all MPO layers after one Adam step of (a copy of) ``model``, divided by the same for its dense
    export, from the same state on the same loss. ``model`` itself is not changed.

    Adam's first step moves each entry by about ``lr`` whatever the gradient's size, so the ratio depends on the
    parametrisation and on the gradient's sign pattern, not on ``lr`` (kept small so first-order terms dominate).
    """
    if not mpo_layers(model):
        raise ConfigError("decomposition.lr_scale=auto has no effect on a student without MPO layers (nothing is "
                          "amplified); use lr_scale=1 or decomposition=mpo")
    mpo_model = copy.deepcopy(model)
    names = list(mpo_layers(mpo_model))
    dense_model = export_dense(copy.deepcopy(model))
    mpo_delta = _one_adam_step(mpo_model, compute_loss, lr, betas, eps, seed=seed, weights=lambda m: {
        name: layer.to_matrix().detach().clone() for name, layer in mpo_layers(m).items()})
    dense_delta = _one_adam_step(dense_model, compute_loss, lr, betas, eps, seed=seed, weights=lambda m: {
        name: m.get_submodule(name).weight.detach().clone() for name in names})
    numerator = math.sqrt(sum(float(d.double().square().sum()) for d in mpo_delta.values()))
    denominator = math.sqrt(sum(float(d.double().square().sum()) for d in dense_delta.values()))
    if denominator == 0.0:
        raise ConfigError("decomposition.lr_scale=auto: the dense student did not move in one step (every MPO target "
                          "frozen?); set lr_scale to a number")
    return numerator / denominator
