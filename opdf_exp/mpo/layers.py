"""Trainable MPO layers: ``MPOLinear`` and ``MPOEmbedding`` hold the local tensors and rebuild W each forward.

Why rebuild W instead of applying the tensors to the activations: OPDF's MPOs are lossless and over-parameterized
(bond r = 576 / 1152 for BERT-base), so a chain applied to a batch costs O(tokens * J * r * i_n), far more than the
dense matmul; rebuilding W costs O(I J r) once per step, independent of the batch. The contraction order is the
cheapest one found by :func:`opdf_exp.mpo.decompose.contraction_plan` (computed once per layer).

Without autograd (validation, test, generation, a frozen teacher) in a single-process job, the rebuilt W is kept
and reused until a local tensor changes (its version counter or storage), so evaluating an MPO model costs what
the dense model costs.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from opdf_exp.errors import ConfigError
from opdf_exp.mpo.decompose import contract_with_plan, contraction_plan, mpo_decompose


class _OptimizerSteps:
    """Counts optimizer steps process-wide, through torch's global post-step hook.

    Why: the graph-free W cache must notice every update of a local tensor, and torch's fused AdamW (and other
    fused or foreach kernels) write parameters without moving their version counter. Any ``Optimizer.step`` moves
    this count, so a cache keyed on it is never stale, whatever the optimizer."""

    count = 0

    @classmethod
    def bump(cls, *_args) -> None:
        cls.count += 1


register_optimizer_step_post_hook(_OptimizerSteps.bump)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class _MPOBase(nn.Module):
    """Shared state of MPO layers: the local tensors, their factors and bonds, and which of them train."""

    # The optimizer puts a module's ``tensors`` into the param group of this name (utils.optim.parameter_groups),
    # so the local tensors get their own rate and decay without utils/ knowing this class.
    optimizer_group = "mpo"

    def _init_mpo(self, tensors: Sequence[torch.Tensor], row_factors: Sequence[int], col_factors: Sequence[int],
                  max_bond: int | None, gauge: str | None, train_central: bool, train_aux: bool) -> None:
        rows, cols = [int(f) for f in row_factors], [int(f) for f in col_factors]
        shapes = [tuple(t.shape) for t in tensors]
        ranks = [s[0] for s in shapes] + [shapes[-1][-1]] if shapes else []
        expected = [(ranks[k], rows[k], cols[k], ranks[k + 1]) for k in range(len(rows))] if shapes else []
        if len(shapes) != len(rows) or shapes != expected or ranks[0] != 1 or ranks[-1] != 1:
            raise ConfigError(f"MPO tensors of shapes {shapes} do not match factors {rows} x {cols}; build the layer "
                              f"with from_linear/from_embedding or pass tensors from mpo_decompose")
        self.row_factors, self.col_factors = rows, cols
        self.ranks = ranks
        self.max_bond = max_bond
        self.gauge = None if gauge == "left" else gauge  # "left" and None both mean left-canonical
        self.tensors = nn.ParameterList(
            [t if isinstance(t, nn.Parameter) else nn.Parameter(t.detach().clone()) for t in tensors])
        self._plan = contraction_plan(tuple(ranks), tuple(i * j for i, j in zip(rows, cols)))
        self._cached_weight: tuple | None = None  # (key, W) of the last graph-free rebuild, see _forward_weight
        self.freeze(central=not train_central, aux=not train_aux)

    # -- roles ------------------------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return len(self.row_factors)

    @property
    def central_index(self) -> int:
        """The paper's central tensor: index (n-1)//2 from 0 (2 for n=5, 3 for n=7), as in the public code."""
        return (self.n - 1) // 2

    @property
    def aux_indices(self) -> list[int]:
        return [k for k in range(self.n) if k != self.central_index]

    def freeze(self, central: bool | None = None, aux: bool | None = None) -> "_MPOBase":
        """Freeze (True) or unfreeze (False) the central and/or auxiliary tensors; None leaves them as they are."""
        for k, t in enumerate(self.tensors):
            flag = central if k == self.central_index else aux
            if flag is not None:
                t.requires_grad_(not flag)
        return self

    # -- sizes ------------------------------------------------------------------------------------------------
    @property
    def num_mpo_params(self) -> int:
        """Trainable size of the weight as an MPO (all local tensors, bias excluded)."""
        return sum(t.numel() for t in self.tensors)

    @property
    def num_dense_params(self) -> int:
        """Size of the dense weight this layer exports to (bias excluded)."""
        return math.prod(self.row_factors) * math.prod(self.col_factors)

    # -- weight -----------------------------------------------------------------------------------------------
    def to_matrix(self) -> torch.Tensor:
        """The dense (rows x cols) weight, differentiable w.r.t. the local tensors."""
        return contract_with_plan(self._plan, list(self.tensors), self.row_factors, self.col_factors)

    def _forward_weight(self) -> torch.Tensor:
        """W for this forward: rebuilt with autograd while training; without a graph the last rebuild is reused
        until a tensor is updated in place (``load_state_dict`` and most in-place ops move the version counter; any
        optimizer step moves :class:`_OptimizerSteps`, fused kernels included) or replaced (storage pointer), or
        the autocast setting differs. Writes through ``.data`` move neither: call ``_cached_weight = None``."""
        if (torch.is_grad_enabled() and any(t.requires_grad for t in self.tensors)) or _distributed():
            # training needs the graph; under FSDP the unsharded storage is refilled by collectives that need not
            # move the version counter, so a distributed job always rebuilds (correct first, fast second)
            self._cached_weight = None
            return self.to_matrix()
        device_type = self.tensors[0].device.type
        key = (tuple((t._version, t.data_ptr(), t.dtype) for t in self.tensors), torch.is_autocast_enabled(device_type),
               _OptimizerSteps.count)
        cached = getattr(self, "_cached_weight", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, self.to_matrix())
            self._cached_weight = cached
        return cached[1]

    def _dense_weight(self) -> torch.Tensor:
        """The contracted weight for export: no graph, and no autocast (a bf16 rebuild would be lossy)."""
        ref = self.tensors[0]
        with torch.no_grad(), torch.autocast(device_type=ref.device.type, enabled=False):
            return self.to_matrix().to(ref.dtype).contiguous()

    def _mpo_repr(self) -> str:
        ratio = self.num_mpo_params / max(self.num_dense_params, 1)
        frozen = [k for k, t in enumerate(self.tensors) if not t.requires_grad]
        text = (f"rows={self.row_factors}, cols={self.col_factors}, bonds={self.ranks}, "
                f"params={self.num_mpo_params:,} (dense {self.num_dense_params:,}, x{ratio:.2f}), "
                f"central={self.central_index}")
        if self.max_bond is not None:
            text += f", max_bond={self.max_bond}"
        if frozen:
            text += f", frozen={frozen}"
        return text


class MPOLinear(_MPOBase):
    """``nn.Linear`` whose weight (out x in; rows factor out_features) is an MPO of n trainable local tensors.

    State-dict keys: ``tensors.0`` .. ``tensors.{n-1}`` and ``bias`` (the original bias Parameter is reused).
    """

    def __init__(self, tensors: Sequence[torch.Tensor], row_factors: Sequence[int], col_factors: Sequence[int],
                 bias: torch.Tensor | None = None, *, max_bond: int | None = None, gauge: str | None = "symmetric",
                 train_central: bool = True, train_aux: bool = True):
        super().__init__()
        self._init_mpo(tensors, row_factors, col_factors, max_bond, gauge, train_central, train_aux)
        self.out_features, self.in_features = self.num_rows, self.num_cols
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias.detach().clone())
        self.bias = bias

    @property
    def num_rows(self) -> int:
        return math.prod(self.row_factors)

    @property
    def num_cols(self) -> int:
        return math.prod(self.col_factors)

    @classmethod
    def from_linear(cls, linear: nn.Linear, row_factors: Sequence[int], col_factors: Sequence[int],
                    max_bond: int | None = None, gauge: str | None = "symmetric", *, train_central: bool = True,
                    train_aux: bool = True, svd: str = "auto") -> "MPOLinear":
        """Decompose ``linear.weight`` (same dtype and device); the bias Parameter is shared, not copied."""
        tensors = mpo_decompose(linear.weight, row_factors, col_factors, max_bond=max_bond, gauge=gauge, svd=svd)
        return cls(tensors, row_factors, col_factors, linear.bias, max_bond=max_bond, gauge=gauge, train_central=train_central,
                   train_aux=train_aux)

    @property
    def weight(self) -> torch.Tensor:
        """Dense weight view for code that reads ``module.weight`` (rebuilt on each access)."""
        return self.to_matrix()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._forward_weight(), self.bias)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the contracted weight (same dtype/device) and this layer's bias Parameter."""
        ref = self.tensors[0]
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=ref.device,
                           dtype=ref.dtype)
        linear.weight = nn.Parameter(self._dense_weight())
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                + self._mpo_repr())


class MPOEmbedding(_MPOBase):
    """``nn.Embedding`` whose (num_embeddings x embedding_dim) matrix is an MPO (rows factor num_embeddings).

    The whole table is rebuilt each forward, so this is only sensible for small vocabularies; embeddings are not in
    any default target list.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], row_factors: Sequence[int], col_factors: Sequence[int], *,
                 padding_idx: int | None = None, scale_grad_by_freq: bool = False, max_bond: int | None = None,
                 gauge: str | None = "symmetric", train_central: bool = True, train_aux: bool = True):
        super().__init__()
        self._init_mpo(tensors, row_factors, col_factors, max_bond, gauge, train_central, train_aux)
        self.num_embeddings, self.embedding_dim = math.prod(self.row_factors), math.prod(self.col_factors)
        self.padding_idx = padding_idx
        self.scale_grad_by_freq = scale_grad_by_freq

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, row_factors: Sequence[int], col_factors: Sequence[int],
                       max_bond: int | None = None, gauge: str | None = "symmetric", *, train_central: bool = True,
                       train_aux: bool = True, svd: str = "auto") -> "MPOEmbedding":
        if embedding.max_norm is not None or embedding.sparse:
            raise ConfigError("an nn.Embedding with max_norm or sparse=True cannot be an MPO (both rewrite or "
                              "sparsify the table itself); remove it from the decomposition targets")
        tensors = mpo_decompose(embedding.weight, row_factors, col_factors, max_bond=max_bond, gauge=gauge, svd=svd)
        return cls(tensors, row_factors, col_factors, padding_idx=embedding.padding_idx,
                   scale_grad_by_freq=embedding.scale_grad_by_freq, max_bond=max_bond, gauge=gauge,
                   train_central=train_central, train_aux=train_aux)

    @property
    def weight(self) -> torch.Tensor:
        return self.to_matrix()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self._forward_weight(), self.padding_idx, None, 2.0, self.scale_grad_by_freq, False)

    def to_embedding(self) -> nn.Embedding:
        ref = self.tensors[0]
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                           scale_grad_by_freq=self.scale_grad_by_freq, device=ref.device, dtype=ref.dtype)
        emb.weight = nn.Parameter(self._dense_weight())
        return emb

    def extra_repr(self) -> str:
        text = f"{self.num_embeddings}, {self.embedding_dim}, "
        if self.padding_idx is not None:
            text += f"padding_idx={self.padding_idx}, "
        return text + self._mpo_repr()


MPO_LAYER_TYPES = (MPOLinear, MPOEmbedding)


def iter_mpo_layers(model: nn.Module) -> Iterable[tuple[str, _MPOBase]]:
    for name, module in model.named_modules():
        if isinstance(module, MPO_LAYER_TYPES):
            yield name, module
