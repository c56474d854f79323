"""Oracle tests of the token mixers, parametrized over ``list_mixers()``: a newly registered mixer is tested at once.

Chunked = recurrent (outputs, gradients of x and of every parameter), state carry across a split, ``step`` =
``recurrent_forward``, materialised matrix @ values = op output, left-padding invariance, QKV copy with GQA, and
the one-line errors. float32, fixed seeds, small widths so that the set runs in about a minute on 2 cores.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch

from opdf_exp.errors import ConfigError
from opdf_exp.mixers import MIXERS, create_mixer, list_mixers, ops
from opdf_exp.mixers.ops import fast

HIDDEN, HEADS = 32, 2
CASES = [(name, {}) for name in list_mixers() if name != "linear_attention"] + \
    [("linear_attention", {"feature_map": fm}) for fm in ("identity", "elu+1", "hedgehog")]
IDS = [f"{n}-{o['feature_map']}" if o else n for n, o in CASES]
# Non-default options (short convs on or off, gates off, groups) through the same oracles.
VARIANTS = [("linear_attention", {"feature_map": "hedgehog", "conv_size": 4}),
            ("linear_attention", {"feature_map": "elu+1", "normalize": True}),
            ("linear_attention", {"feature_map": "hedgehog", "normalize": True, "output_norm": False}),
            ("linear_attention", {"feature_map": "hedgehog", "normalize": True, "output_norm": False, "window": 8}),
            ("linear_attention", {"feature_map": "elu+1", "normalize": True, "window": 3, "conv_size": 4}),
            ("retnet", {"conv_size": 4, "use_output_gate": False}), ("gla", {"conv_size": 4, "expand_v": 2.0}),
            ("deltanet", {"conv_size": 0, "use_output_gate": True}), ("gated_deltanet", {"conv_size": 3}),
            ("mlstm", {"conv_size": 4, "gate_soft_cap": 0.0}), ("metala", {"conv_size": 0, "qk_ratio": 1.0}),
            ("mamba2", {"n_groups": 1, "d_state": 8})]
VARIANT_IDS = [n + "-" + "-".join(f"{k}={v}" for k, v in o.items()) for n, o in VARIANTS]
ALL, ALL_IDS = CASES + VARIANTS, IDS + VARIANT_IDS


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def build(name, options, seed=0, **extra):
    torch.manual_seed(seed)
    mixer = create_mixer(name, HIDDEN, HEADS, **options, **extra)
    with torch.no_grad():  # move every parameter off its (often symmetric) init so that each one matters
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mixer


def inputs(batch, t, seed=1):
    torch.manual_seed(seed)
    return torch.randn(batch, t, HIDDEN)


def grads(mixer, x, fn):
    x = x.clone().requires_grad_(True)
    mixer.zero_grad()
    y = fn(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in mixer.named_parameters() if p.grad is not None}


def test_registry_has_the_eight():
    assert set(list_mixers()) >= {"linear_attention", "retnet", "gla", "metala", "mamba2", "mlstm", "deltanet",
                                  "gated_deltanet"}
    assert list(MIXERS) == list_mixers()


@pytest.mark.parametrize("t", [256, 70], ids=["T256", "T70"])
@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_chunk_equals_recurrent_with_gradients(name, options, t):
    _check_chunk_vs_recurrent(name, options, t)


@pytest.mark.parametrize("name,options", VARIANTS, ids=VARIANT_IDS)
def test_chunk_equals_recurrent_with_gradients_variants(name, options):
    _check_chunk_vs_recurrent(name, options, 70)


def _check_chunk_vs_recurrent(name, options, t):
    mixer = build(name, options)
    x = inputs(2 if t != 256 else 1, t)
    y_c, gx_c, gp_c = grads(mixer, x, mixer)
    y_r, gx_r, gp_r = grads(mixer, x, mixer.recurrent_forward)
    assert y_c.shape == x.shape
    assert rel(y_c, y_r) < 1e-4
    assert rel(gx_c, gx_r) < 1e-3
    trained = {n for n, p in mixer.named_parameters() if p.requires_grad}
    assert set(gp_c) == set(gp_r) == trained, "every parameter must receive a gradient"
    for n in gp_c:
        assert rel(gp_c[n], gp_r[n]) < 1e-3, n


@pytest.mark.parametrize("name,options", ALL, ids=ALL_IDS)
def test_split_with_state_carry_equals_one_pass(name, options):
    mixer = build(name, options)
    x = inputs(2, 160)
    with torch.no_grad():
        y, final = mixer(x, output_final_state=True)
        y1, s1 = mixer(x[:, :70], output_final_state=True)
        y2, s2 = mixer(x[:, 70:], initial_state=s1, output_final_state=True)
    assert rel(torch.cat([y1, y2], 1), y) < 1e-5
    assert set(s2) == set(final) == set(mixer.state_shape(2))
    for key in final:
        assert tuple(final[key].shape) == mixer.state_shape(2)[key]
        assert rel(s2[key], final[key]) < 1e-5, key


@pytest.mark.parametrize("name,options", ALL, ids=ALL_IDS)
def test_steps_equal_recurrent_forward(name, options):
    mixer = build(name, options)
    x = inputs(2, 12)
    with torch.no_grad():
        y_ref, s_ref = mixer.recurrent_forward(x, output_final_state=True)
        state, ys = None, []
        for t in range(x.shape[1]):
            y_t, state = mixer.step(x[:, t], state)
            ys.append(y_t)
    assert ys[0].shape == (2, HIDDEN)
    assert rel(torch.stack(ys, 1), y_ref) < 1e-5
    for key in s_ref:
        assert state[key].shape == s_ref[key].shape
        assert rel(state[key], s_ref[key]) < 1e-5, key


@pytest.mark.parametrize("name,options", ALL, ids=ALL_IDS)
def test_chunked_prefill_then_steps_equals_one_pass(name, options):
    mixer = build(name, options)
    x = inputs(2, 75)
    with torch.no_grad():
        y = mixer(x)
        _, state = mixer(x[:, :70], output_final_state=True)  # prefill with the chunked kernel
        steps = []
        for t in range(70, 75):
            y_t, state = mixer.step(x[:, t], state)
            steps.append(y_t)
    assert rel(torch.stack(steps, 1), y[:, 70:]) < 1e-5


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_bfloat16_mixer_tracks_float32(name, options):
    mixer = build(name, options)
    x = inputs(2, 80)
    with torch.no_grad():
        y32 = mixer(x)
        y16 = mixer.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    assert rel(y16.float(), y32) < 5e-2  # bfloat16 has 8 mantissa bits; MetaLA needed its float32 augmentation


@pytest.mark.parametrize("op", ["gla", "delta_rule", "mlstm", "ssd"])
def test_ops_accept_bfloat16_inputs(op):
    fn, args, kwargs = _op_cases(40)[op]
    low = [a.to(torch.bfloat16) for a in args]
    o32, _ = fn(*(a.float() for a in low))  # the same rounded inputs in float32
    o16, _ = fn(*low)
    assert o16.dtype == torch.bfloat16
    assert rel(o16.float(), o32) < 1e-2  # only the output's bfloat16 rounding


@pytest.mark.parametrize("name,options", ALL + [("metala", {"self_augmentation": False})],
                         ids=ALL_IDS + ["metala-noaug"])
def test_materialized_matrix_times_values_equals_op(name, options):
    mixer = build(name, options)
    x = inputs(2, 70)
    if not mixer.matrix_form:
        with pytest.raises(ConfigError, match="no mixing-matrix form"):
            mixer.materialize(x)
        return
    with torch.no_grad():
        m = mixer.materialize(x)
        inp, _ = mixer._prepare(x, None, {})
        o, _ = mixer._core(inp, {}, "chunk", False)
    assert m.shape == (2, HEADS, 70, 70)
    assert torch.all(m.triu(1) == 0), "causal"
    v = mixer._values(inp).transpose(1, 2)  # (B, H, T, V)
    assert rel(m @ v, o.transpose(1, 2)) < 1e-4


@pytest.mark.parametrize("t,decay", [(70, 1.0), (100, 8.0), (1, 1.0), (16, 1.0)])
def test_chunked_per_key_gated_matrix_equals_its_closed_form_in_float64(t, decay):
    """GLA's matrix is built in chunks through the chunk ends (no (B, H, T, T, K) tensor); the oracle is the closed
    form with that tensor. decay=8 per step makes exp(G) underflow long before T = 100: the chunked form only
    ever takes exp of non-positive differences, so it stays finite and exact to rounding, for T not a multiple
    of the chunk too; gradients flow to q, k and the decays."""
    torch.manual_seed(t)
    q = torch.randn(2, t, 3, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, t, 3, 8, dtype=torch.float64, requires_grad=True)
    g = (-decay * torch.rand(2, t, 3, 8, dtype=torch.float64)).requires_grad_()
    qh, kh, cum = (q * 0.3).transpose(1, 2), k.transpose(1, 2), g.transpose(1, 2).cumsum(2)  # (B, H, T, K)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    diff = (cum.unsqueeze(-2) - cum.unsqueeze(-3)).masked_fill(~causal[..., None], float("-inf"))  # (B,H,T,T,K)
    oracle = torch.einsum("bhik,bhjk,bhijk->bhij", qh, kh, diff.exp())
    m = ops.gated_matrix(q, k, g, scale=0.3)
    assert m.shape == (2, 3, t, t) and torch.isfinite(m).all()
    assert (m - oracle).abs().max() < 1e-12
    one_chunk = ops.matrix._per_key_matrix(qh, kh, cum, chunk=t)  # the benchmark's "before": the closed form
    assert (one_chunk - oracle).abs().max() < 1e-12
    w = torch.randn_like(m)
    got = torch.autograd.grad((m * w).sum(), (q, k, g))
    want = torch.autograd.grad((oracle * w).sum(), (q, k, g))
    for a, b in zip(got, want):
        assert torch.isfinite(a).all() and (a - b).abs().max() < 1e-10


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@pytest.mark.parametrize("name,options", ALL, ids=ALL_IDS)
def test_left_padding_leaves_real_tokens_unchanged(name, options, mode):
    mixer = build(name, options)
    pad, real = 6, 20
    x = inputs(2, pad + real)
    mask = torch.ones(2, pad + real)
    mask[0, :pad] = 0
    run = mixer if mode == "chunk" else mixer.recurrent_forward
    with torch.no_grad():
        y = run(x, mask)
        alone = run(x[:1, pad:])
        full = run(x[1:])
    assert rel(y[0, pad:], alone[0]) < 1e-5
    assert rel(y[1], full[0]) < 1e-5


# -- QKV copy ----------------------------------------------------------------------------------------------------
def teacher_weights(hidden=48, heads=4, kv_heads=2, head_dim=16, seed=3):
    torch.manual_seed(seed)
    return {"q_weight": torch.randn(heads * head_dim, hidden) / hidden ** 0.5,
            "k_weight": torch.randn(kv_heads * head_dim, hidden) / hidden ** 0.5,
            "v_weight": torch.randn(kv_heads * head_dim, hidden) / hidden ** 0.5,
            "o_weight": torch.randn(hidden, heads * head_dim) / hidden ** 0.5}


def hf_repeat_kv(h: torch.Tensor, n_rep: int) -> torch.Tensor:
    """transformers' repeat_kv, verbatim in behaviour: (B, H_kv, T, d) -> (B, H_kv * n_rep, T, d)."""
    b, kv, t, d = h.shape
    return h[:, :, None].expand(b, kv, n_rep, t, d).reshape(b, kv * n_rep, t, d)


def test_qkv_copy_reproduces_teacher_logits_with_gqa():
    hidden, heads, kv_heads, head_dim = 48, 4, 2, 16  # head_dim != hidden / heads = 12
    w = teacher_weights(hidden, heads, kv_heads, head_dim)
    mixer = create_mixer("linear_attention", hidden, heads, head_dim=head_dim, feature_map="identity")
    copied = mixer.init_from_attention(**w, num_kv_heads=kv_heads, head_dim=head_dim)
    assert "k_proj.weight" in copied
    torch.manual_seed(0)
    x = torch.randn(2, 12, hidden)
    q = (x @ w["q_weight"].T).view(2, 12, heads, head_dim).transpose(1, 2)  # (B, H, T, d)
    k = (x @ w["k_weight"].T).view(2, 12, kv_heads, head_dim).transpose(1, 2)  # (B, H_kv, T, d)
    logits = (q @ hf_repeat_kv(k, heads // kv_heads).transpose(-1, -2)) / head_dim ** 0.5
    with torch.no_grad():
        m = mixer.materialize(x)
    assert torch.allclose(m, logits.tril(), atol=1e-5)


@pytest.mark.parametrize("name", list_mixers())
def test_qkv_copy_expands_kv_heads_like_repeat_kv(name):
    hidden, heads, kv_heads, head_dim = 48, 4, 2, 16
    w = teacher_weights(hidden, heads, kv_heads, head_dim)
    options = {"qk_ratio": 1.0} if name == "metala" else {}
    mixer = create_mixer(name, hidden, heads, head_dim=head_dim, **options)
    mixer.init_from_attention(**w, num_kv_heads=kv_heads, head_dim=head_dim)
    expected_k = hf_repeat_kv(w["k_weight"].view(1, kv_heads, head_dim, hidden), 2).reshape(heads * head_dim, hidden)
    expected_v = hf_repeat_kv(w["v_weight"].view(1, kv_heads, head_dim, hidden), 2).reshape(heads * head_dim, hidden)
    if name == "mamba2":
        d = heads * head_dim
        rows = mixer.in_proj.weight
        assert torch.equal(rows[d:2 * d], expected_v) and torch.equal(rows[2 * d:3 * d], expected_k)
        assert torch.equal(rows[3 * d:4 * d], w["q_weight"]) and torch.equal(mixer.out_proj.weight, w["o_weight"])
        return
    assert torch.equal(mixer.q_proj.weight, w["q_weight"]) and torch.equal(mixer.v_proj.weight, expected_v)
    assert torch.equal(mixer.o_proj.weight, w["o_weight"])
    if name != "metala":  # MetaLA has no key projection
        assert torch.equal(mixer.k_proj.weight, expected_k)


def test_qkv_copy_with_biases_expands_kv_biases():
    hidden, heads, kv_heads, head_dim = 48, 4, 2, 16
    w = teacher_weights(hidden, heads, kv_heads, head_dim)
    biases = {"q_bias": torch.randn(heads * head_dim), "k_bias": torch.randn(kv_heads * head_dim),
              "v_bias": torch.randn(kv_heads * head_dim)}
    mixer = create_mixer("gated_deltanet", hidden, heads, head_dim=head_dim, qkv_bias=True)
    copied = mixer.init_from_attention(**w, **biases, num_kv_heads=kv_heads, head_dim=head_dim)
    assert {"q_proj.bias", "k_proj.bias", "v_proj.bias"} <= set(copied)
    assert torch.equal(mixer.q_proj.bias, biases["q_bias"])
    assert torch.equal(mixer.k_proj.bias, biases["k_bias"].view(kv_heads, head_dim).repeat_interleave(2, 0).flatten())
    with pytest.raises(ConfigError, match="pass qkv_bias=True"):
        create_mixer("gla", hidden, heads, head_dim=head_dim).init_from_attention(
            **w, **biases, num_kv_heads=kv_heads, head_dim=head_dim)


# -- ops vs their naive recurrences -------------------------------------------------------------------------------
def _op_cases(t):
    torch.manual_seed(5)
    b, h, kd, vd = 2, 2, 16, 8
    q, k, v = torch.randn(b, t, h, kd), torch.randn(b, t, h, kd), torch.randn(b, t, h, vd)
    g = torch.nn.functional.logsigmoid(torch.randn(b, t, h))
    gk = torch.nn.functional.logsigmoid(3 * torch.randn(b, t, h, kd)) * 2  # strong decays: down to about -20
    beta = torch.rand(b, t, h)
    s0 = torch.randn(b, h, kd, vd)
    x, dt = torch.randn(b, t, 4, vd), torch.nn.functional.softplus(torch.randn(b, t, 4))
    A, Bm, Cm = -torch.rand(4) - 0.5, torch.randn(b, t, 2, kd), torch.randn(b, t, 2, kd)
    i, f = 3 * torch.randn(b, t, h), 3 * torch.randn(b, t, h) + 2
    m0 = (torch.randn(b, h, kd, vd), torch.randn(b, h, kd), torch.randn(b, h))
    return {
        "linear_attn": (ops.linear_attn, (q, k, v), {"initial_state": s0}),
        "simple_gla": (ops.simple_gla, (q, k, v, g), {"initial_state": s0}),
        "gla": (ops.gla, (q, k, v, gk), {"initial_state": s0}),  # strong decays: the sub-chunk path
        "gla-weak": (ops.gla, (q, k, v, gk / 40), {"initial_state": s0}),  # the single-reference path
        "delta_rule": (ops.delta_rule, (q, k, v, beta), {"initial_state": s0, "use_qk_l2norm": True}),
        "gated_delta_rule": (ops.gated_delta_rule, (q, k, v, g, beta), {"initial_state": s0, "use_qk_l2norm": True}),
        "mlstm": (ops.mlstm, (q, k, v, i, f), {"initial_state": m0}),
        "ssd": (ops.ssd, (x, dt, A, Bm, Cm), {"initial_state": torch.randn(b, 4, kd, vd)}),
    }


@pytest.mark.parametrize("t", [128, 77])
@pytest.mark.parametrize("op", list(_op_cases(8)))
def test_ops_chunk_equal_naive_with_state_and_gradients(op, t):
    fn, args, kwargs = _op_cases(t)[op]

    def run(mode):
        leaves = [a.clone().requires_grad_(True) for a in args]
        init = kwargs["initial_state"]
        init = tuple(s.clone().requires_grad_(True) for s in init) if isinstance(init, tuple) else \
            (init.clone().requires_grad_(True),)
        extra = {**kwargs, "initial_state": init if len(init) > 1 else init[0]}
        o, final = fn(*leaves, mode=mode, output_final_state=True, **extra)
        finals = final if isinstance(final, tuple) else (final,)
        loss = (o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() + sum(s.pow(2).mean() for s in finals)
        loss.backward()
        return o.detach(), [s.detach() for s in finals], [a.grad for a in [*leaves, *init]]

    o_c, f_c, g_c = run("chunk")
    o_r, f_r, g_r = run("recurrent")
    assert rel(o_c, o_r) < 1e-4
    for a, b in zip(f_c, f_r):
        assert rel(a, b) < 1e-4
    assert len(g_c) == len(args) + (3 if op == "mlstm" else 1)  # inputs and initial state
    for a, b in zip(g_c, g_r):
        assert rel(a, b) < 1e-3


@pytest.mark.parametrize("op", list(_op_cases(8)))
def test_ops_chunk_equal_naive_in_float64(op):
    """In float64 every chunked kernel meets its recurrence to round-off (mLSTM's log forget gate included, which
    used to pass through float32), final states too."""
    fn, args, kwargs = _op_cases(77)[op]
    init = kwargs["initial_state"]
    double = {**kwargs, "initial_state": tuple(s.double() for s in init) if isinstance(init, tuple) else init.double()}
    args = [a.double() for a in args]
    o_c, f_c = fn(*args, mode="chunk", output_final_state=True, **double)
    o_r, f_r = fn(*args, mode="recurrent", output_final_state=True, **double)
    assert o_c.dtype == torch.float64 and rel(o_c, o_r) < 1e-12
    for a, b in zip(f_c if isinstance(f_c, tuple) else (f_c,), f_r if isinstance(f_r, tuple) else (f_r,)):
        assert a.dtype == torch.float64 and rel(a, b) < 1e-12


def test_ops_default_scale_and_zero_state():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 10, 1, 4), torch.randn(1, 10, 1, 4), torch.randn(1, 10, 1, 3)
    o, final = ops.linear_attn(q, k, v)
    assert final is None
    manual = ((q[:, :, 0] @ k[:, :, 0].transpose(-1, -2)) * 0.5).tril() @ v[:, :, 0]
    assert torch.allclose(o[:, :, 0], manual, atol=1e-5)


# -- fast kernels: chosen by device, never on CPU -------------------------------------------------------------------
def test_cpu_tensors_never_take_a_stubbed_fast_package(monkeypatch):
    calls = []

    def boom(*args, **kwargs):
        calls.append(1)
        raise AssertionError("fast kernel called on CPU")

    for module, attr in fast.KERNELS.values():
        parts = module.split(".")
        for n in range(1, len(parts) + 1):
            monkeypatch.setitem(sys.modules, ".".join(parts[:n]), types.ModuleType(".".join(parts[:n])))
        setattr(sys.modules[module], attr, boom)
    fast.clear_cache()
    try:
        for name, (fn, args, kwargs) in _op_cases(40).items():
            assert fast.fast_kernel(name.split("-")[0], args[0]) is None
            fn(*args, **kwargs)
        mixer = build("mamba2", {})
        mixer(inputs(1, 40))

        class FakeCuda:
            is_cuda = True
            dtype = torch.bfloat16

        assert fast.fast_kernel("gla", FakeCuda()) is boom  # a CUDA tensor would take it
        assert fast.fast_kernel("gated_delta_rule", FakeCuda()) is boom
        FakeCuda.dtype = torch.float32
        assert fast.fast_kernel("gated_delta_rule", FakeCuda()) is None  # fla's delta rules reject float32
        assert not calls
    finally:
        fast.clear_cache()


# -- bad input -------------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_one_line_errors():
    with pytest.raises(ConfigError, match="unknown mixer 'mamba3'.*gated_deltanet"):
        create_mixer("mamba3", 32, 2)
    with pytest.raises(ConfigError, match="num_heads=5 does not divide hidden_size=32"):
        create_mixer("gla", 32, 5)
    with pytest.raises(ConfigError, match="no mixing-matrix form"):
        create_mixer("metala", 32, 2).materialize(torch.randn(1, 8, 32))
    with pytest.raises(ConfigError, match=r"feature_map='relu' is not supported by linear_attention"):
        create_mixer("linear_attention", 32, 2, feature_map="relu")
    with pytest.raises(ConfigError, match="has no option"):
        create_mixer("gla", 32, 2, feature_map="identity")
    w = teacher_weights(48, 4, 2, 16)
    student = create_mixer("gla", 48, 4)  # head_dim 12, the teacher's is 16
    with pytest.raises(ConfigError, match=r"\(64, 48\).*\(48, 48\)|\(48, 48\).*\(64, 48\)"):
        student.init_from_attention(**w, num_kv_heads=2, head_dim=12)
    with pytest.raises(ConfigError, match=r"q_proj.weight of shape \(64, 48\) into the student's q_proj.weight of "
                                          r"shape \(48, 48\)"):
        student.init_from_attention(**w, num_kv_heads=2, head_dim=16)
    with pytest.raises(ConfigError, match="num_kv_heads=3 must divide"):
        create_mixer("gla", 48, 4, head_dim=16).init_from_attention(**w, num_kv_heads=3, head_dim=16)
    with pytest.raises(ConfigError) as info:
        create_mixer("nope", 32, 2)
    assert "\n" not in str(info.value)


def test_mixers_import_without_lightning_hydra_transformers_timm():
    import subprocess
    code = ("import sys, opdf_exp.mixers; print(sorted(m for m in ('pytorch_lightning', 'lightning', 'hydra', "
            "'omegaconf', 'transformers', 'timm', 'fla', 'mamba_ssm', 'mlstm_kernels') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", list_mixers())
def test_mpo_decomposition_targets_the_projections(name):
    from opdf_exp.mpo import MPOLinear, apply_decomposition
    mixer = build(name, {})
    x = inputs(1, 20)
    with torch.no_grad():
        y = mixer(x)
    apply_decomposition(mixer, kind="mpo", n=3, targets=["*proj"])
    assert any(isinstance(m, MPOLinear) for m in mixer.modules())
    with torch.no_grad():
        assert rel(mixer(x), y) < 1e-4  # lossless MPO: same function


def test_normalised_linear_attention_is_a_weighted_mean_of_values():
    """normalize=True divides by phi(q_t).sum_j phi(k_j): with a positive feature map every output row is a
    convex combination of the values seen so far, so constant values come out unchanged and the mixing matrix's
    rows sum to one."""
    mixer = build("linear_attention", {"feature_map": "elu+1", "normalize": True})
    x = inputs(2, 40)
    with torch.no_grad():
        inp, _ = mixer._prepare(x, None, {})
        inp["v"] = torch.full_like(inp["v"], 3.0)
        inp["v_den"] = torch.cat([inp["v"], torch.ones_like(inp["v"][..., :1])], -1)
        o, _ = mixer._core(inp, {}, "chunk", False)
        m = mixer._matrix(inp)
    assert torch.allclose(o, torch.full_like(o, 3.0), atol=1e-4)
    assert torch.allclose(m.sum(-1), torch.ones(2, HEADS, 40), atol=1e-5) and (m >= 0).all()
    assert mixer.state_shape(2)["S"][-1] == mixer.value_dim + 1  # the denominator column travels in the state


def test_sliding_window_covering_the_sequence_is_softmax_attention():
    """With window >= T no key is old enough for the linear kernel: LoLCATs' hybrid is then exactly causal softmax
    attention of the (rotated) queries and keys, whatever the window factor; with a short window, the weights of
    the materialised matrix are positive, sum to one, and keys inside the window carry softmax ratios."""
    t = 24
    mixer = build("linear_attention", {"feature_map": "hedgehog", "normalize": True, "output_norm": False,
                                       "window": t, "rope": True})
    x, rot = inputs(2, t), _rotary(2, t, HIDDEN // HEADS)
    with torch.no_grad():
        y = mixer(x, rotary=rot)
        mixer._rotary = rot
        q, k, v, _ = mixer._qkv(x, None, {})
        mixer._rotary = None
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, H, T, D)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert rel(y, mixer.o_proj(ref.transpose(1, 2).flatten(2))) < 1e-5
        short = build("linear_attention", {"feature_map": "hedgehog", "normalize": True, "output_norm": False,
                                           "window": 4})
        m = short.materialize(x)  # (B, H, T, T)
        assert (m >= 0).all() and torch.allclose(m.sum(-1), torch.ones_like(m.sum(-1)), atol=1e-5)
        inp, _ = short._prepare(x, None, {})
        s = torch.einsum("bihd,bjhd->bhij", inp["q_raw"], inp["k_raw"]) * short.key_dim ** -0.5
        i = 10  # keys 7..10 are in query 10's window: their weights are in softmax ratio
        ratio = m[:, :, i, 8] / m[:, :, i, 9]
        assert torch.allclose(ratio, (s[:, :, i, 8] - s[:, :, i, 9]).exp(), rtol=1e-4)
    with pytest.raises(ConfigError, match="pass normalize=True with it"):
        create_mixer("linear_attention", HIDDEN, HEADS, window=4)


# -- the teacher's RoPE on the mixers' queries and keys -----------------------------------------------------------
def _rotary(batch, t, dim, offset=0):
    """Llama-convention tables (cos, sin) of shape (B, T, D) for positions offset..offset+T-1."""
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.arange(offset, offset + t, dtype=torch.float32)[:, None] * inv[None]  # (T, D/2)
    emb = torch.cat([angles, angles], -1)
    return emb.cos().expand(batch, t, dim), emb.sin().expand(batch, t, dim)


ROPE = [name for name in list_mixers() if name not in ("mamba2", "metala")]


@pytest.mark.parametrize("name", ROPE)
def test_rope_mixers_chunk_recurrent_state_steps_and_matrix_agree(name):
    """With rope=True every path sees the same rotated queries and keys: chunk == recurrence (with gradients),
    a split with state carry == one pass, token steps (each with its position's tables) == the recurrence, and
    the mixing matrix times the values == the op."""
    mixer = build(name, {"rope": True})
    x = inputs(2, 70)
    rot = _rotary(2, 70, mixer.head_dim)
    y_c, gx_c, _ = grads(mixer, x, lambda z: mixer(z, rotary=rot))
    y_r, gx_r, _ = grads(mixer, x, lambda z: mixer.recurrent_forward(z, rotary=rot))
    assert rel(y_c, y_r) < 1e-4 and rel(gx_c, gx_r) < 1e-3
    with torch.no_grad():
        y, final = mixer(x, rotary=rot, output_final_state=True)
        _, s1 = mixer(x[:, :40], rotary=_rotary(2, 40, mixer.head_dim), output_final_state=True)
        y2, s2 = mixer(x[:, 40:], rotary=_rotary(2, 30, mixer.head_dim, offset=40), initial_state=s1,
                       output_final_state=True)
        assert rel(y2, y[:, 40:]) < 1e-5 and all(rel(s2[k], final[k]) < 1e-5 for k in final)
        state, steps = None, []
        for t in range(6):
            y_t, state = mixer.step(x[:, t], state, rotary=_rotary(2, 1, mixer.head_dim, offset=t))
            steps.append(y_t)
        assert rel(torch.stack(steps, 1), y[:, :6]) < 1e-4
        if mixer.matrix_form:
            m = mixer.materialize(x, rotary=rot)
            mixer._rotary = rot
            inp, _ = mixer._prepare(x, None, {})
            mixer._rotary = None
            o, _ = mixer._core(inp, {}, "chunk", False)
            assert rel(m @ mixer._values(inp).transpose(1, 2), o.transpose(1, 2)) < 1e-4
    assert not torch.allclose(y, build(name, {})(x), atol=1e-3)  # the rotation changes the output


def test_rope_linear_attention_matrix_is_relative_position_attention():
    """Identity features, no normaliser: M_ij = scale * q_i . R(j - i) k_j, the rotation of the teacher's RoPE
    (checked against transformers' own apply_rotary_pos_emb on the same projections)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    mixer = build("linear_attention", {"feature_map": "identity", "rope": True})
    x = inputs(1, 20)
    cos, sin = _rotary(1, 20, mixer.head_dim)
    with torch.no_grad():
        m = mixer.materialize(x, rotary=(cos, sin))
        q = mixer.q_proj(x).view(1, 20, HEADS, -1).transpose(1, 2)  # (B, H, T, D)
        k = mixer.k_proj(x).view(1, 20, HEADS, -1).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        expected = (q @ k.transpose(-1, -2) * mixer.head_dim ** -0.5).tril()
    assert rel(m, expected) < 1e-5


def test_rope_bad_input_in_one_line():
    with pytest.raises(ConfigError, match=r"rope=true is not defined for mamba2 .* it is for linear_attention, "):
        create_mixer("mamba2", HIDDEN, HEADS, rope=True)
    with pytest.raises(ConfigError, match="keep the key size at head_dim"):
        create_mixer("gla", HIDDEN, HEADS, expand_k=2.0, rope=True)
    with pytest.raises(ConfigError, match="built with rope=true: pass the teacher's rotary tables"):
        create_mixer("gla", HIDDEN, HEADS, rope=True)(inputs(1, 5))
