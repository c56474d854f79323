"""Model surgery: swap targeted ``nn.Linear``/``nn.Embedding`` modules for MPO layers and back.

Target patterns are shell globs (``fnmatch``, case-sensitive) matched against the full dotted module name *or any
dotted suffix of it*, so ``"query"`` matches ``bert.encoder.layer.0.attention.self.query`` and
``"blocks.*.mlp.fc1"`` matches ``blocks.3.mlp.fc1``. A pattern starting with ``re:`` is a Python regular expression
that must match the full module name (``re.fullmatch``). Only ``nn.Linear`` and ``nn.Embedding`` modules are
eligible; every pattern must match at least one of them.
"""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Iterable, Mapping, Sequence

import torch.nn as nn

from opdf_exp.errors import ConfigError
from opdf_exp.mpo.decompose import (check_factors, check_gauge, check_max_bond, check_product, mpo_num_params,
                                    mpo_ranks)
from opdf_exp.mpo.layers import MPO_LAYER_TYPES, MPOEmbedding, MPOLinear, iter_mpo_layers

log = logging.getLogger(__name__)

# Default targets per model family: the matrices OPDF over-parameterizes (attention and FFN, not embeddings, pooler
# or heads).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense"],
    "vit": ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"],
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj"],
    # the subquadratic student (opdf_exp.subquadratic): a Llama whose self_attn is a token mixer. "self_attn.*"
    # takes every nn.Linear under it: the mixers' projections and gates, and q/k/v/o of kept attention layers
    "subquadratic": ["self_attn.*", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
}
# transformers model_type -> family (encoders sharing BERT's module names, decoders sharing Llama's).
_MODEL_TYPES = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "electra": "bert", "camembert": "bert",
                "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma": "llama",
                "gemma2": "llama", "olmo": "llama", "vit": "vit",
                "opdf_subquadratic_llama": "subquadratic"}
_LAYOUTS = ("balanced", "ends")


# --------------------------------------------------------------------------------------------------- factors
def balanced_factors(dim: int, n: int) -> list[int]:
    """n factors whose product is ``dim``, as balanced as possible (minimal variance of their logs), descending.

    1s are used when ``dim`` has fewer than n prime factors (e.g. 7 -> [7, 1, 1]). 768, 5 -> [4, 4, 4, 4, 3]
    (MPOP's shape); 3072, 5 -> [8, 6, 4, 4, 4].
    """
    dim, n = int(dim), int(n)
    if dim < 1 or n < 1:
        raise ConfigError(f"balanced_factors needs dim >= 1 and n >= 1, got dim={dim}, n={n}")
    best: list[Any] = [math.inf, None]

    def search(rest: int, slots: int, upper: int, chosen: list[int], score: float) -> None:
        if score >= best[0]:
            return
        if slots == 1:
            if rest <= upper:
                total = score + math.log(rest) ** 2
                if total < best[0]:
                    best[0], best[1] = total, chosen + [rest]
            return
        # next factor f (non-increasing order) must satisfy f**slots >= rest (else the rest cannot fit below f)
        low = max(1, math.ceil(rest ** (1.0 / slots) - 1e-9))
        for f in range(min(upper, rest), low - 1, -1):
            if rest % f == 0:
                search(rest // f, slots - 1, f, chosen + [f], score + math.log(f) ** 2)

    search(dim, n, dim, [], 0.0)
    return best[1]


def end_factors(dim: int, n: int) -> list[int]:
    """OPDF's public-code layout: [a, 1, ..., 1, b] with a >= b the divisor pair closest to sqrt(dim).

    768 -> [32, 1, 1, 1, 24] and 3072 -> [64, 1, 1, 1, 48] for n = 5, as hard-coded in the released code.
    """
    dim, n = int(dim), int(n)
    if n < 2:
        raise ConfigError(f"end_factors needs n >= 2, got n={n}")
    b = max(d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0)
    return [dim // b] + [1] * (n - 2) + [b]


def _normalize_factors(factors: Mapping | None, n: int | None) -> dict[int, list[int]]:
    if factors is None:
        return {}
    if not isinstance(factors, Mapping):
        raise ConfigError(f"factors must map a dimension to its factor list, e.g. {{768: [32, 1, 1, 1, 24]}}; "
                          f"got {type(factors).__name__}")
    out: dict[int, list[int]] = {}
    for key, value in factors.items():
        try:
            dim = int(key)
        except (TypeError, ValueError):
            raise ConfigError(f"factors key {key!r} is not a dimension; use integer keys such as 768") from None
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise ConfigError(f"factors[{dim}]={value!r} must be a list of integers, e.g. [32, 1, 1, 1, 24]")
        facs = list(value)
        try:
            facs = [int(f) for f in facs]
        except (TypeError, ValueError):
            raise ConfigError(f"factors[{dim}]={facs!r} must contain integers") from None
        if not facs or any(f < 1 for f in facs):
            raise ConfigError(f"factors[{dim}]={facs} must be positive integers")
        check_product(facs, dim)
        if len(facs) < 2:
            raise ConfigError(f"factors[{dim}]={facs} has one entry; an MPO needs n >= 2 local tensors")
        if n is not None and len(facs) != n:
            raise ConfigError(f"factors[{dim}]={facs} has {len(facs)} entries but n={n}; make them agree "
                              f"(or set n=null to take n from factors)")
        out[dim] = facs
    return out


# --------------------------------------------------------------------------------------------------- targets
def detect_family(model: nn.Module) -> str | None:
    """'bert' | 'vit' | 'llama' | 'subquadratic' from ``config.model_type`` or, failing that, from module names."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if isinstance(model_type, str) and model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    names = [name for name, _ in model.named_modules()]
    if any(name.endswith("attention.self.query") for name in names):
        return "bert"
    if any(n.endswith("self_attn.q_proj") for n in names) and any(n.endswith("mlp.gate_proj") for n in names):
        return "llama"
    if any(name.endswith("attn.qkv") for name in names) and any(name.endswith("mlp.fc1") for name in names):
        return "vit"
    return None


def default_targets(model: nn.Module) -> list[str]:
    family = detect_family(model)
    if family is None:
        raise ConfigError(f"cannot infer default MPO targets for {type(model).__name__} (not BERT-, ViT- or "
                          f"Llama-like); pass targets=[...] with module-name patterns such as 'mlp.fc1'")
    return list(DEFAULT_TARGETS[family])


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatchcase(name, pattern) or fnmatchcase(name, "*." + pattern)


def match_targets(model: nn.Module, targets: Sequence[str] | str | None) -> dict[str, nn.Module]:
    """Eligible modules (nn.Linear / nn.Embedding) matched by the patterns, in model order."""
    if targets is None:
        targets = default_targets(model)
    if isinstance(targets, str):
        targets = [targets]
    targets = [str(t) for t in targets]
    if not targets:
        raise ConfigError("targets is empty; give module-name patterns or null for the family defaults")
    for pattern in targets:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as error:
                raise ConfigError(f"target pattern {pattern!r} is not a valid regular expression ({error})") from None
    modules = list(model.named_modules())
    found: dict[str, nn.Module] = {}
    for pattern in targets:
        hits = [(name, m) for name, m in modules if _matches(name, pattern)]
        eligible = [(name, m) for name, m in hits if isinstance(m, (nn.Linear, nn.Embedding))]
        if not eligible:
            already = [name for name, m in hits if isinstance(m, MPO_LAYER_TYPES)]
            if already:
                raise ConfigError(f"target pattern {pattern!r} matches only modules that are already MPO layers "
                                  f"({already[0]}, ...); call export_dense first or drop the pattern")
            other = (f" (it matches {type(hits[0][1]).__name__} {hits[0][0]!r}, which is not "
                     f"nn.Linear/nn.Embedding)" if hits else "")
            example = next((name for name, m in modules if isinstance(m, nn.Linear)), None)
            raise ConfigError(f"target pattern {pattern!r} matches no nn.Linear/nn.Embedding in "
                              f"{type(model).__name__}{other}; use a module-name glob such as {example!r}")
        for name, m in eligible:
            found.setdefault(name, m)
    order = {name: i for i, (name, _) in enumerate(modules)}
    return dict(sorted(found.items(), key=lambda kv: order[kv[0]]))


def _check_untied(model: nn.Module, chosen: Mapping[str, nn.Module]) -> None:
    """Refuse a target whose weight Parameter is shared (e.g. tied input/output embeddings): replacing it would
    silently untie the copies."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight")
        if weight is not None:
            owners.setdefault(id(weight), []).append(name)
    for name, module in chosen.items():
        holders = sorted(set(owners.get(id(module.weight), [name])))
        if len(holders) > 1:
            raise ConfigError(f"{name}.weight is tied to {', '.join(h for h in holders if h != name)}; untie the "
                              f"weights (e.g. tie_word_embeddings=False) or remove {name!r} from the targets")


# --------------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class MPOPlanEntry:
    """What :func:`overparameterize` will do to one module (also usable as a dry run)."""

    name: str
    kind: str  # "linear" | "embedding"
    shape: tuple[int, int]  # (rows, cols) = (out_features, in_features) or (num_embeddings, dim)
    row_factors: tuple[int, ...]
    col_factors: tuple[int, ...]
    ranks: tuple[int, ...]
    mpo_params: int

    @property
    def dense_params(self) -> int:
        return self.shape[0] * self.shape[1]


def check_decomposition_options(n: int | None = None, factors: Mapping | None = None, max_bond: int | None = None,
                                layout: str = "balanced", gauge: str | None = "symmetric",
                                targets: Sequence[str] | str | None = None) -> tuple[int | None, int | None, dict]:
    """Validate every option that needs no model (so a bad value fails on the submitting machine, before any
    teacher trains); return ``(n, max_bond, factors table)``. Shape checks stay in :func:`plan_decomposition`."""
    if n is not None:
        try:
            valid = not isinstance(n, bool) and int(n) == n and int(n) >= 2
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise ConfigError(f"n={n!r} must be an integer >= 2 (the number of local tensors; 2 is the SVD case)")
        n = int(n)
    try:
        max_bond = check_max_bond(max_bond)
    except (TypeError, ValueError):
        raise ConfigError(f"max_bond={max_bond!r} must be a positive integer (or null for a lossless MPO)") from None
    if layout not in _LAYOUTS:
        raise ConfigError(f"layout={layout!r} is unknown; use one of {', '.join(_LAYOUTS)}")
    check_gauge(gauge)
    table = _normalize_factors(factors, n)
    if n is None and table:
        lengths = {len(v) for v in table.values()}
        if len(lengths) > 1:
            raise ConfigError(f"factor lists have different lengths {sorted(lengths)}; give every dimension the "
                              f"same number of factors (pad with 1s)")
    for pattern in ([targets] if isinstance(targets, str) else list(targets or [])):
        if str(pattern).startswith("re:"):
            try:
                re.compile(str(pattern)[3:])
            except re.error as error:
                raise ConfigError(f"target pattern {pattern!r} is not a valid regular expression ({error})") from None
    if targets is not None and not isinstance(targets, str) and not list(targets):
        raise ConfigError("targets is empty; give module-name patterns or null for the family defaults")
    return n, max_bond, table


def plan_decomposition(model: nn.Module, targets: Sequence[str] | str | None = None,
                       factors: Mapping | None = None, n: int | None = None, max_bond: int | None = None,
                       layout: str = "balanced") -> list[MPOPlanEntry]:
    """Validate every argument and resolve the factors of each targeted matrix without touching the model.

    A dimension listed in ``factors`` uses that list (for rows and columns alike); any other dimension gets
    ``balanced_factors(dim, n)`` (layout="balanced", MPOP-style) or ``end_factors(dim, n)`` (layout="ends", the
    public OPDF code's [a,1,..,1,b]).
    """
    n, max_bond, table = check_decomposition_options(n=n, factors=factors, max_bond=max_bond, layout=layout)
    chosen = match_targets(model, targets)
    _check_untied(model, chosen)

    def factors_for(dim: int, name: str) -> list[int]:
        if dim in table:
            return table[dim]
        if n is None:
            raise ConfigError(f"no factors for dimension {dim} (module {name}); add {dim}: [...] to factors or set "
                              f"n to choose balanced factors automatically")
        return balanced_factors(dim, n) if layout == "balanced" else end_factors(dim, n)

    plan = []
    for name, module in chosen.items():
        shape = tuple(module.weight.shape)
        rows, cols = factors_for(shape[0], name), factors_for(shape[1], name)
        rows, cols = check_factors(shape, rows, cols)
        plan.append(MPOPlanEntry(name=name, kind="embedding" if isinstance(module, nn.Embedding) else "linear",
                                 shape=shape, row_factors=tuple(rows), col_factors=tuple(cols),
                                 ranks=tuple(mpo_ranks(rows, cols, max_bond)),
                                 mpo_params=mpo_num_params(rows, cols, max_bond)))
    return plan


# --------------------------------------------------------------------------------------------------- surgery
def _replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if name == "":
        return new
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
    return model


def overparameterize(model: nn.Module, targets: Sequence[str] | str | None = None, factors: Mapping | None = None,
                     n: int | None = None, max_bond: int | None = None, train_central: bool = True,
                     train_aux: bool = True, gauge: str | None = "symmetric", layout: str = "balanced",
                     svd: str = "auto") -> nn.Module:
    """Replace targeted ``nn.Linear``/``nn.Embedding`` modules by MPO layers, in place; return the model.

    Everything is validated before the first module is replaced, so a ConfigError leaves the model untouched.
    Each MPO layer reproduces its original weight (lossless unless ``max_bond`` truncates); biases are shared.
    """
    check_gauge(gauge)
    plan = plan_decomposition(model, targets=targets, factors=factors, n=n, max_bond=max_bond, layout=layout)
    start = time.perf_counter()
    for entry in plan:
        module = model.get_submodule(entry.name) if entry.name else model
        kwargs = dict(max_bond=max_bond, gauge=gauge, train_central=train_central, train_aux=train_aux, svd=svd)
        if entry.kind == "embedding":
            new = MPOEmbedding.from_embedding(module, entry.row_factors, entry.col_factors, **kwargs)
        else:
            new = MPOLinear.from_linear(module, entry.row_factors, entry.col_factors, **kwargs)
        new.train(module.training)
        model = _replace(model, entry.name, new)
    log.info("over-parameterized %d modules as MPOs in %.1f s", len(plan), time.perf_counter() - start)
    return model


def export_dense(model: nn.Module) -> nn.Module:
    """Contract every MPO layer back into its original class (nn.Linear / nn.Embedding), in place.

    Same dtype and device, bias Parameter reused, so state-dict keys equal the original model's.
    """
    for name, layer in list(iter_mpo_layers(model)):
        dense = layer.to_linear() if isinstance(layer, MPOLinear) else layer.to_embedding()
        dense.train(layer.training)
        model = _replace(model, name, dense)
    return model


def mpo_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{module name: MPO layer} in model order."""
    return dict(iter_mpo_layers(model))


def count_params(model: nn.Module) -> dict[str, int]:
    """{"train": trainable parameters now, "inference": parameters after :func:`export_dense`} (no copy made).

    Shared Parameters count once; an MPO layer counts its dense weight shape for inference.
    """
    layers = mpo_layers(model)
    mpo_ids = {id(t) for layer in layers.values() for t in layer.tensors}
    train = inference = 0
    for p in model.parameters():
        if p.requires_grad:
            train += p.numel()
        if id(p) not in mpo_ids:
            inference += p.numel()
    inference += sum(layer.num_dense_params for layer in layers.values())
    return {"train": train, "inference": inference}


def check_decomposition_kind(kind: str, n: int | None, factors: Mapping | None) -> tuple[str, int | None]:
    """``(kind, n)`` checked against each other: svd is n = 2; mpo needs n or factors."""
    kind = str(kind).lower()
    if kind == "svd":
        if n is not None and str(n) != "2":
            raise ConfigError(f"kind=svd means n=2, got n={n}; use kind=mpo for n={n}")
        return kind, 2
    if kind == "mpo" and n is None and not factors:
        raise ConfigError("kind=mpo needs n (number of local tensors, e.g. 5) or factors {dim: [...]}")
    if kind not in ("none", "svd", "mpo"):
        raise ConfigError(f"decomposition kind={kind!r} is unknown; use none, svd or mpo")
    return kind, n


def check_decomposition(kind: str = "none", n: int | None = None, factors: Mapping | None = None,
                        max_bond: int | None = None, targets: Sequence[str] | str | None = None,
                        gauge: str | None = "symmetric", layout: str = "balanced", **_ignored: Any) -> None:
    """Every check of :func:`apply_decomposition` that needs no model: a config-time check (``_ignored`` takes
    the training flags and ``align``, which have their own checks)."""
    kind, n = check_decomposition_kind(kind, n, factors)
    if kind != "none":
        check_decomposition_options(n=n, factors=factors, max_bond=max_bond, layout=layout, gauge=gauge,
                                    targets=targets)


def apply_decomposition(model: nn.Module, kind: str = "none", n: int | None = None, factors: Mapping | None = None,
                        max_bond: int | None = None, targets: Sequence[str] | str | None = None,
                        train_central: bool = True, train_aux: bool = True, gauge: str | None = "symmetric",
                        layout: str = "balanced", align: Any = None) -> nn.Module:
    """Config-level entry point (plain kwargs, Hydra-free): kind "none" | "svd" (n = 2) | "mpo".

    ``factors`` keys may be ints or strings. ``align`` is accepted and ignored so the runner can pass the whole
    ``decomposition`` config group (the alignment loss is built separately, see :mod:`opdf_exp.mpo.align`).
    """
    kind, n = check_decomposition_kind(kind, n, factors)
    if kind == "none":
        return model
    return overparameterize(model, targets=targets, factors=factors, n=n, max_bond=max_bond,
                            train_central=train_central, train_aux=train_aux, gauge=gauge, layout=layout)
