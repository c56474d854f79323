"""The mixer interface and registry: every token mixer maps (B, T, hidden) -> (B, T, hidden) the same way.

Why one base class: the distillation stages need the same five things from every student mixer: a fast chunked
``forward`` (training), the same maths one token at a time (``recurrent_forward``, the oracle), a fixed-size
generation ``step``, the (B, H, T, T) mixing matrix for matrix alignment (``materialize``) and QKV copying from
the teacher's attention (``init_from_attention``). Subclasses only say how inputs become op arguments
(``_prepare``), which op runs (``_core``) and how the op output becomes the layer output (``_output``); the base
class handles masks, modes and state so that those paths cannot drift apart.

State is a dict of tensors: the recurrent state (``S`` [B, H, K, V]; mLSTM ``C``, ``n``, ``m``) plus the short-conv
caches (``conv_*`` [B, C, kernel - 1]), so that splitting a sequence and carrying the state, or stepping token by
token, reproduces one pass exactly. ``attention_mask`` (B, T) follows Hugging Face (1 = token, 0 = left padding):
pad tokens get zero keys/values and conv inputs and a neutral decay, so real tokens see exactly what they would
see without the padding.
"""
from __future__ import annotations

import inspect
import math
from typing import ClassVar

import torch
import torch.nn as nn

from opdf_exp.errors import ConfigError

State = dict[str, torch.Tensor]

MIXERS: dict[str, type["Mixer"]] = {}


def register_mixer(cls: type["Mixer"]) -> type["Mixer"]:
    MIXERS[cls.name] = cls
    return cls


def list_mixers() -> list[str]:
    """Registered mixer names, in registration order."""
    return list(MIXERS)


def rope_families() -> list[str]:
    """Mixers on which the teacher's rotary position embedding is defined (they have per-head queries and keys)."""
    return [name for name, cls in MIXERS.items() if cls.supports_rope]


def create_mixer(name: str, hidden_size: int, num_heads: int, **options) -> "Mixer":
    """Build a registered mixer; unknown names and options raise one-line ConfigErrors. ``rope=True`` (any family
    in :func:`rope_families`) rotates its queries and keys with the rotary tables passed to each call."""
    if name not in MIXERS:
        raise ConfigError(f"unknown mixer {name!r}; known mixers: {', '.join(MIXERS)}")
    cls = MIXERS[name]
    rope = bool(options.pop("rope", False))
    if rope and not cls.supports_rope:
        raise ConfigError(f"rope=true is not defined for {name} (no per-head queries and keys to rotate); it is for "
                          f"{', '.join(rope_families())}")
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "hidden_size", "num_heads")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"mixer {name!r} has no option(s) {unknown}; it accepts {accepted + ['rope']}")
    mixer = cls(hidden_size, num_heads, **options)
    if rope:
        rotated = getattr(mixer, "key_dim", mixer.head_dim)
        if rotated != mixer.head_dim:
            raise ConfigError(f"rope=true rotates queries and keys of the teacher's head_dim {mixer.head_dim}, but "
                              f"{name}'s keys have {rotated} dims here; keep the key size at head_dim (expand_k=1)")
        mixer.rope = True
    return mixer


def apply_rotary(x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate ``x`` (B, T, H, D) by the teacher's rotary tables ``(cos, sin)`` (B, T, D), Llama's convention
    (``x cos + rotate_half(x) sin``)."""
    cos, sin = (t.unsqueeze(2).to(x.dtype) for t in rotary)  # (B, T, 1, D)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def expand_kv(weight: torch.Tensor, num_kv_heads: int, head_dim: int, num_heads: int) -> torch.Tensor:
    """GQA key/value weight (or bias) rows expanded like HF ``repeat_kv``: query head h reads KV head h // n_rep."""
    n_rep = num_heads // num_kv_heads
    rest = weight.shape[1:]
    w = weight.reshape(num_kv_heads, head_dim, *rest)  # (H_kv, d_h, D)
    return w.repeat_interleave(n_rep, dim=0).reshape(num_heads * head_dim, *rest)  # (H * d_h, D)


def check_teacher(name: str, num_heads: int, hidden_size: int, q_weight, k_weight, v_weight, o_weight,
                  num_kv_heads: int, head_dim: int) -> None:
    """Shape checks shared by all QKV copies; errors name both shapes."""
    if q_weight.shape[0] != num_heads * head_dim or q_weight.shape[1] != hidden_size:
        raise ConfigError(f"{name}: teacher q_weight {tuple(q_weight.shape)} does not fit {num_heads} heads x "
                          f"head_dim {head_dim} on width {hidden_size} (expected {(num_heads * head_dim, hidden_size)})")
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ConfigError(f"{name}: num_kv_heads={num_kv_heads} must divide the {num_heads} query heads")
    for label, w in (("k_weight", k_weight), ("v_weight", v_weight)):
        if tuple(w.shape) != (num_kv_heads * head_dim, hidden_size):
            raise ConfigError(f"{name}: teacher {label} {tuple(w.shape)} does not match num_kv_heads={num_kv_heads} x "
                              f"head_dim={head_dim} (expected {(num_kv_heads * head_dim, hidden_size)})")
    if tuple(o_weight.shape) != (hidden_size, num_heads * head_dim):
        raise ConfigError(f"{name}: teacher o_weight {tuple(o_weight.shape)} is not "
                          f"{(hidden_size, num_heads * head_dim)}")


@torch.no_grad()
def copy_into(name: str, target: torch.Tensor, source: torch.Tensor, label: str) -> None:
    if tuple(target.shape) != tuple(source.shape):
        raise ConfigError(f"{name}: cannot copy teacher {label} of shape {tuple(source.shape)} into the student's "
                          f"{label} of shape {tuple(target.shape)}; build the mixer with the teacher's head_dim")
    target.copy_(source.to(target.dtype))


class Mixer(nn.Module):
    """Base class; see the module docstring. Subclasses set ``name`` and implement the ``_*`` hooks."""

    name: ClassVar[str] = ""
    matrix_form: ClassVar[bool] = True
    supports_rope: ClassVar[bool] = False   # per-head queries and keys the teacher's RoPE can rotate
    rope: bool = False                      # set by create_mixer(..., rope=True)
    _rotary = None                          # the current call's (cos, sin), see _run

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int | None = None, chunk_size: int = 64):
        super().__init__()
        if hidden_size <= 0 or num_heads <= 0:
            raise ConfigError(f"{self.name}: hidden_size={hidden_size} and num_heads={num_heads} must be positive")
        if head_dim is None:
            if hidden_size % num_heads:
                raise ConfigError(f"{self.name}: num_heads={num_heads} does not divide hidden_size={hidden_size}; "
                                  f"pick a divisor or pass head_dim")
            head_dim = hidden_size // num_heads
        self.hidden_size, self.num_heads, self.head_dim, self.chunk_size = hidden_size, num_heads, head_dim, chunk_size

    # -- hooks ------------------------------------------------------------------------------------------------
    def _prepare(self, x: torch.Tensor, mask: torch.Tensor | None, state: State) -> tuple[dict, State]:
        """x (B, T, hidden), mask (B, T, 1) or None -> (op inputs, new conv caches)."""
        raise NotImplementedError

    def _core(self, inp: dict, state: State, mode: str, want_state: bool) -> tuple[torch.Tensor, State]:
        raise NotImplementedError

    def _output(self, o: torch.Tensor, inp: dict) -> torch.Tensor:
        raise NotImplementedError

    def _matrix(self, inp: dict) -> torch.Tensor:
        raise ConfigError(f"{self.name} has no mixing-matrix form; use stage-1 alignment 'output' instead of 'matrix'")

    def _values(self, inp: dict) -> torch.Tensor:
        return inp["v"]

    def state_shape(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the recurrent state and conv caches for one batch: fixed in T."""
        raise NotImplementedError

    # -- public API -------------------------------------------------------------------------------------------
    def state_numel(self, batch_size: int = 1) -> int:
        return sum(math.prod(s) for s in self.state_shape(batch_size).values())

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> State:
        """Zeros everywhere (mLSTM's max state m_0 = 0 too, as in xLSTM)."""
        return {k: torch.zeros(s, device=device, dtype=dtype) for k, s in self.state_shape(batch_size).items()}

    def _run(self, x, attention_mask, initial_state, mode, want_state, rotary=None):
        if self.rope and rotary is None:
            raise ConfigError(f"{self.name} was built with rope=true: pass the teacher's rotary tables (rotary=(cos, "
                              "sin), the decoder's position_embeddings)")
        self._rotary = rotary if self.rope else None  # read by _prepare (queries and keys), this call only
        try:
            return self._run_prepared(x, attention_mask, initial_state, mode, want_state)
        finally:
            self._rotary = None

    def _run_prepared(self, x, attention_mask, initial_state, mode, want_state):
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ConfigError(f"{self.name}: expected input (batch, T, {self.hidden_size}); got {tuple(x.shape)}")
        mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != tuple(x.shape[:2]):
                raise ConfigError(f"{self.name}: attention_mask {tuple(attention_mask.shape)} must be (batch, T) = "
                                  f"{tuple(x.shape[:2])}")
            mask = attention_mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
        state = dict(initial_state or {})
        inp, conv = self._prepare(x, mask, state)
        o, core = self._core(inp, state, mode, want_state)
        y = self._output(o, inp)
        return y, ({**core, **conv} if want_state else None)

    def forward(self, x, attention_mask=None, *, initial_state: State | None = None, output_final_state=False,
                rotary=None):
        y, state = self._run(x, attention_mask, initial_state, "chunk", output_final_state, rotary)
        return (y, state) if output_final_state else y

    def recurrent_forward(self, x, attention_mask=None, *, initial_state: State | None = None,
                          output_final_state=False, rotary=None):
        y, state = self._run(x, attention_mask, initial_state, "recurrent", output_final_state, rotary)
        return (y, state) if output_final_state else y

    def step(self, x_t: torch.Tensor, state: State | None = None, rotary=None) -> tuple[torch.Tensor, State]:
        """One generation step: x_t (B, hidden) or (B, 1, hidden); state None means zeros; ``rotary`` the tables
        of this token's position (B, 1, D) when the mixer was built with ``rope=True``."""
        squeeze = x_t.dim() == 2
        x = x_t.unsqueeze(1) if squeeze else x_t
        if state is None:
            state = self.init_state(x.shape[0], x.device)
        y, new_state = self._run(x, None, state, "recurrent", True, rotary)
        return (y[:, 0] if squeeze else y), new_state

    def materialize(self, x: torch.Tensor, attention_mask=None, rotary=None) -> torch.Tensor:
        """The (B, H, T, T) mixing matrix M with op output = M @ values per head (zero initial state)."""
        if not self.matrix_form:
            self._matrix({})
        if self.rope and rotary is None:
            raise ConfigError(f"{self.name} was built with rope=true: pass rotary=(cos, sin) to materialize")
        mask = None if attention_mask is None else attention_mask.to(x.dtype).unsqueeze(-1)
        self._rotary = rotary if self.rope else None
        try:
            inp, _ = self._prepare(x, mask, {})
        finally:
            self._rotary = None
        return self._matrix(inp)

    def init_from_attention(self, q_weight, k_weight, v_weight, o_weight, *, num_kv_heads: int, head_dim: int,
                            q_bias=None, k_bias=None, v_bias=None) -> list[str]:
        """QKV copy from a teacher attention (weights in nn.Linear layout: (out, in)); returns what was copied."""
        raise ConfigError(f"{self.name} does not support QKV copying")

    @property
    def output_projection(self) -> nn.Linear:
        """The linear map from the per-head outputs to the hidden size (``o_proj``, Mamba2's ``out_proj``): the
        teacher's o_proj after QKV copying, and where ``calibrate_output_scales`` folds its per-channel scales."""
        return self.o_proj if hasattr(self, "o_proj") else self.out_proj

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, head_dim={self.head_dim}"
