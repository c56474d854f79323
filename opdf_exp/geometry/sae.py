"""Sparse autoencoders that measure a teacher's feature count F, sparsity alpha and importances E[z^2].

* :class:`SparseAutoencoder`: ``kind="relu"`` is the authors' variant (ReLU + L1, pre-encoder bias ``b_pre``
  subtracted before the encoder and added back after the decoder, decoder columns renormalised to unit norm after
  every step); ``kind="topk"`` keeps the k largest pre-activations (Gao et al. 2024), with an optional AuxK loss on
  dead latents.
* :func:`collect_activations`: a forward hook on any named module (``gpt_neox.layers.2`` or ``gpt_neox.layers[2]``)
  of any model; an unknown path raises :class:`ConfigError` listing close matches.
* :func:`train_sae` trains with a Lightning ``Trainer``; :func:`measure` returns F (alive latents), L0,
  alpha = 1 - L0/F, sorted E[z^2], g(alpha) and d*.
* :func:`planted_superposition`: synthetic data with known F and alpha, the ground truth for tests.

No Hydra here.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from opdf_exp.errors import ConfigError
from opdf_exp.geometry import theory

SAE_KINDS = ("relu", "topk")


class SparseAutoencoder(nn.Module):
    """z = act(W_enc (x - b_pre) + b_enc); x_hat = W_dec z + b_pre, with unit-norm decoder columns."""

    def __init__(self, d_in: int, n_latents: int, kind: str = "topk", k: int = 32, l1_coeff: float = 1e-3,
                 aux_k: int = 0, aux_coeff: float = 1 / 32, dead_after_tokens: int = 100_000, seed: int = 0):
        super().__init__()
        if kind not in SAE_KINDS:
            raise ConfigError(f"sae kind '{kind}' is unknown; use one of {', '.join(SAE_KINDS)}")
        if kind == "topk" and not 0 < int(k) <= n_latents:
            raise ConfigError(f"sae k={k} must be between 1 and the dictionary size {n_latents}")
        if int(n_latents) < 1 or int(d_in) < 1:
            raise ConfigError(f"sae needs d_in >= 1 and n_latents >= 1 (got {d_in}, {n_latents})")
        gen = torch.Generator().manual_seed(seed)
        w_dec = torch.randn(d_in, n_latents, generator=gen)
        w_dec /= w_dec.norm(dim=0, keepdim=True)
        self.kind, self.k, self.l1_coeff = kind, int(k), float(l1_coeff)
        self.aux_k, self.aux_coeff, self.dead_after_tokens = int(aux_k), float(aux_coeff), int(dead_after_tokens)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.t().clone())
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.b_pre = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("tokens_since_fired", torch.zeros(n_latents, dtype=torch.long))

    @property
    def n_latents(self) -> int:
        return self.W_dec.shape[1]

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x - self.b_pre, self.W_enc, self.b_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activations(x)
        if self.kind == "relu":
            return F.relu(pre)
        values, index = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, index, F.relu(values))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.linear(z, self.W_dec) + self.b_pre

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return self.decode(z), z

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """ReLU: mean-squared error (over tokens and dims) + l1_coeff * (per-token sum of |z|, averaged over tokens).
        TopK: mean-squared error (+ aux_coeff * AuxK loss on dead latents when aux_k > 0)."""
        pre = self.pre_activations(x)
        if self.kind == "relu":
            z = F.relu(pre)
        else:
            values, index = pre.topk(self.k, dim=-1)
            z = torch.zeros_like(pre).scatter_(-1, index, F.relu(values))
        x_hat = self.decode(z)
        recon = F.mse_loss(x_hat, x)
        parts = {"recon": recon.detach()}
        total = recon
        if self.kind == "relu":
            l1 = z.abs().sum(-1).mean()
            total = total + self.l1_coeff * l1
            parts["l1"] = l1.detach()
        with torch.no_grad():
            fired = (z > 0).any(0)
            self.tokens_since_fired += x.shape[0]
            self.tokens_since_fired[fired] = 0
        if self.kind == "topk" and self.aux_k > 0:
            dead = self.tokens_since_fired > self.dead_after_tokens
            if dead.any():
                k_aux = min(self.aux_k, int(dead.sum()))
                masked = pre.masked_fill(~dead, float("-inf"))
                values, index = masked.topk(k_aux, dim=-1)
                z_aux = torch.zeros_like(pre).scatter_(-1, index, F.relu(values))
                residual = (x - x_hat).detach()
                aux = F.mse_loss(F.linear(z_aux, self.W_dec), residual)
                total = total + self.aux_coeff * aux
                parts["aux"] = aux.detach()
        parts["l0"] = (z > 0).float().sum(-1).mean().detach()
        return total, parts

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=0, keepdim=True).clamp_min(1e-8))


@dataclass
class SAETrainConfig:
    kind: str = "topk"
    n_latents: int = 512
    expansion: float | None = None  # if set, n_latents = round(expansion * d_in)
    k: int = 32
    l1_coeff: float = 1e-3
    aux_k: int = 0
    aux_coeff: float = 1 / 32
    dead_after_tokens: int = 100_000
    steps: int = 1000
    batch_size: int = 4096
    lr: float = 1e-3
    warmup_steps: int = 0
    normalize: bool = True  # rescale activations so that E||x||^2 = d_in while training (undone in measure)
    alive_threshold: float = 1e-5
    seed: int = 0


@dataclass
class SAEMeasurement:
    """What an SAE says about the hooked layer; ``importances`` are the alive latents' E[z^2], sorted descending."""

    n_latents: int
    n_alive: int
    l0: float
    alpha: float
    g: float
    d_star: float
    d_star_from_l0: float
    importances: np.ndarray
    frequencies: np.ndarray  # P(z_i > 0) for every latent (dictionary order)
    fvu: float  # fraction of variance unexplained by the reconstruction
    power_law_slope: float
    top10_share: float
    n_tokens: int
    alive_threshold: float
    extra: dict = field(default_factory=dict)

    def predicted_floors(self, widths: Iterable[int]) -> np.ndarray:
        """Eq. 2 with the SAE's sorted E[z^2] as importances (ex2 = 1): squared-residual-norm units."""
        return theory.predicted_floor(list(widths), self.alpha, self.importances, 1.0)

    def kept(self, widths: Iterable[int]) -> np.ndarray:
        return theory.kept_features(list(widths), self.alpha, self.n_alive)

    def summary(self) -> dict:
        return {"n_latents": self.n_latents, "F_alive": self.n_alive, "L0": self.l0, "alpha": self.alpha,
                "g_alpha": self.g, "d_star": self.d_star, "d_star_from_l0": self.d_star_from_l0, "fvu": self.fvu,
                "importance_slope": self.power_law_slope, "top10_share": self.top10_share,
                "n_tokens": self.n_tokens, "alive_threshold": self.alive_threshold, **self.extra}


@torch.no_grad()
def latent_codes(sae: SparseAutoencoder, activations: torch.Tensor, scale: float = 1.0,
                 batch_size: int = 8192, device: str | torch.device = "cpu") -> torch.Tensor:
    """z for every row of ``activations`` (on the CPU), in the original activation units (divided by ``scale``)."""
    x = activations.detach().float().reshape(-1, activations.shape[-1])
    sae.to(device)
    try:
        return torch.cat([sae.encode(x[i:i + batch_size].to(device) * scale).cpu()
                          for i in range(0, x.shape[0], batch_size)]) / scale
    finally:
        sae.cpu()


@torch.no_grad()
def measure(sae: SparseAutoencoder, activations: torch.Tensor, scale: float = 1.0, alive_threshold: float = 1e-5,
            batch_size: int = 8192, device: str | torch.device = "cpu") -> SAEMeasurement:
    """F (latents with firing frequency > ``alive_threshold``), L0 (mean active latents per token),
    alpha = 1 - L0/F, E[z^2] per alive latent (mean over all tokens, zeros included; original units), g, d*."""
    x = activations.detach().float().reshape(-1, activations.shape[-1])
    n = x.shape[0]
    fired = torch.zeros(sae.n_latents, dtype=torch.float64)
    sq = torch.zeros(sae.n_latents, dtype=torch.float64)
    err = 0.0
    sae.to(device)
    try:
        for i in range(0, n, batch_size):
            xb = x[i:i + batch_size].to(device) * scale
            z = sae.encode(xb)
            fired += (z > 0).sum(0).double().cpu()
            sq += (z / scale).double().square().sum(0).cpu()
            err += float((sae.decode(z) - xb).double().square().sum()) / scale ** 2
    finally:
        sae.cpu()
    freq = (fired / n).numpy()
    alive = freq > alive_threshold
    n_alive = int(alive.sum())
    l0 = float(fired.sum() / n)
    if n_alive < 2 or not 0 < l0 < n_alive:
        raise ConfigError(f"the SAE has {n_alive} alive latents and L0={l0:.2f}, so alpha is undefined; "
                          f"train longer, lower l1_coeff or lower k")
    alpha = theory.alpha_from_l0(n_alive, l0)
    importances = np.sort((sq / n).numpy()[alive])[::-1].copy()
    var = float((x - x.mean(0)).square().sum())
    slope = _power_law_slope(importances)
    top10 = float(importances[:10].sum() / max(importances.sum(), 1e-30))
    return SAEMeasurement(
        n_latents=sae.n_latents, n_alive=n_alive, l0=l0, alpha=alpha, g=theory.capacity(alpha),
        d_star=theory.critical_width(n_alive, alpha), d_star_from_l0=theory.critical_width_from_l0(n_alive, l0),
        importances=importances, frequencies=freq, fvu=err / max(var, 1e-30), power_law_slope=slope,
        top10_share=top10, n_tokens=n, alive_threshold=alive_threshold)


def _power_law_slope(sorted_values: np.ndarray) -> float:
    """Log-log slope of sorted importances against rank over the middle 80% (as the authors' measurement)."""
    v = np.asarray(sorted_values, dtype=float)
    lo, hi = int(0.1 * v.size), int(0.9 * v.size)
    sel = v[lo:hi]
    ranks = np.arange(lo + 1, hi + 1, dtype=float)
    ok = sel > 0
    if ok.sum() < 3:
        return float("nan")
    return float(np.polyfit(np.log(ranks[ok]), np.log(sel[ok]), 1)[0])


# --------------------------------------------------------------------------------------------- hooks on any model
_BRACKETS = re.compile(r"\[(\d+)\]")


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule named ``path`` (``a.b.3`` or ``a.b[3]``); unknown paths raise a one-line error with close
    matches."""
    normalized = _BRACKETS.sub(r".\1", str(path)).strip(".")
    modules = dict(model.named_modules())
    if normalized in modules and normalized:
        return modules[normalized]
    names = [name for name in modules if name]
    close = difflib.get_close_matches(normalized, names, n=5, cutoff=0.6)
    last = normalized.rsplit(".", 1)[-1]
    close += [name for name in names if name.rsplit(".", 1)[-1] == last and name not in close]
    close = close[:5]
    hint = f"; close matches: {', '.join(close)}" if close else f"; top-level modules: {', '.join(n for n in names if '.' not in n)}"
    raise ConfigError(f"SAE hook point '{path}' names no module of {type(model).__name__}{hint}")


@torch.no_grad()
def collect_activations(model: nn.Module, module_path: str, batches: Iterable[Mapping[str, torch.Tensor] | torch.Tensor],
                        max_tokens: int | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
    """Run ``model`` over ``batches`` and return the hooked module's outputs as (tokens, d).

    A batch is a tensor (passed positionally) or a mapping of model inputs; when it holds an ``attention_mask``,
    padded positions are dropped. Tuple outputs (HF blocks) contribute their first element.
    """
    module = resolve_module(model, module_path)
    store: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        store.append(output[0] if isinstance(output, (tuple, list)) else output)

    handle = module.register_forward_hook(hook)
    chunks, total = [], 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            store.clear()
            if isinstance(batch, Mapping):
                inputs = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
                model(**inputs)
                mask = inputs.get("attention_mask")
            else:
                model(batch.to(device))
                mask = None
            if not store:
                raise ConfigError(f"hook point '{module_path}' did not run in the forward pass; pick a module on the path")
            act = store[-1].detach().float()
            act = act[mask.bool()] if mask is not None and act.dim() == 3 else act.reshape(-1, act.shape[-1])
            chunks.append(act.cpu())
            total += act.shape[0]
            if max_tokens and total >= max_tokens:
                break
    finally:
        handle.remove()
        model.train(was_training)
    if not chunks:
        raise ConfigError("no batches were given to collect activations from")
    out = torch.cat(chunks)
    return out[:max_tokens] if max_tokens else out


# ------------------------------------------------------------------------------------------------- planted truth
@dataclass
class PlantedData:
    activations: torch.Tensor  # (n_samples, d)
    directions: torch.Tensor  # (n_features, d), unit norm
    n_features: int
    alpha: float
    codes: torch.Tensor | None = None  # (n_samples, n_features) magnitudes, only if asked for


def planted_superposition(n_samples: int, d: int = 64, n_features: int = 512, alpha: float = 0.98, seed: int = 0,
                          noise: float = 0.0, return_codes: bool = False, chunk: int = 65536) -> PlantedData:
    """x = sum_i s_i f_i with F random unit directions f_i in R^d; s_i ~ U[0,1] with probability 1 - alpha
    (independently), so the true L0 is F (1 - alpha) and the true sparsity is alpha."""
    theory.capacity(alpha)
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_features, d, generator=gen)
    directions /= directions.norm(dim=1, keepdim=True)
    p = 1.0 - alpha
    xs, codes = [], []
    for start in range(0, n_samples, chunk):
        u = torch.rand(min(chunk, n_samples - start), n_features, generator=gen)
        s = torch.where(u < p, u / p, torch.zeros(()))
        xs.append(s @ directions)
        if return_codes:
            codes.append(s)
    x = torch.cat(xs)
    if noise:
        x = x + noise * torch.randn(x.shape, generator=gen)
    return PlantedData(x, directions, n_features, alpha, torch.cat(codes) if return_codes else None)
