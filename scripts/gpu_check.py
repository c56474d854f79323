"""One prepared GPU check: every GPU code path of the framework on a one-GPU machine, in at most 8 minutes,
written to ``gpu_report.md`` (``make gpu-check``; ``--dry-run`` checks here, without a GPU, that every step
composes and says what would run).

Steps (each timed; a failing step is reported and the others still run):

1. versions: Python, torch, CUDA, the GPU, Lightning, transformers, timm, and the optional fused kernels;
2. ``pytest tests/test_gpu.py`` (chunked mixer kernels vs recurrences on CUDA, MPO under bf16 autocast, text and
   vision jobs with ``trainer=gpu``);
3. ``trainer=gpu`` in bf16-mixed, a few steps of each task family on tiny random models, with MPO: text
   distillation with tensor alignment, a timm ViT, the three subquadratic stages with two mixers, the geometry toy
   study;
4. FSDP on one device (text distillation with an MPO student);
5. the mixers' fused kernels (fla, mamba_ssm, mlstm_kernels) against our chunked torch kernels on CUDA: outputs,
   final states and gradients, float32 and bf16 (``OPDF_MIXERS_FAST=0`` is the torch path), then forward+backward
   tokens/s of every mixer layer against an SDPA (flash) attention layer of the same width at T = 2k, 8k, 32k;
6. the OPDF training-step overhead against dense at 4,096 tokens per step (bf16-mixed, a 6-layer BERT-base-width
   student with random weights, MPO n = 2, 3, 5).

The GPU machine has no network. What its image lacks is carried as wheels beside the tree and installed first
with ``--wheels DIR`` (``pip install --no-index --find-links DIR``). Fetch them on a machine with PyPI:

    pip download --no-deps -d wheels hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 \\
        hydra-submitit-launcher hydra-joblib-launcher hydra-optuna-sweeper submitit optuna alembic colorlog \\
        sqlalchemy mako tensorly==0.10.0 tensorly-torch==0.5.0 wandb gguf flash-linear-attention mlstm_kernels
    pip download --no-deps -d wheels -e .   # or build this project's wheel: pip wheel --no-deps -w wheels .

(mamba_ssm and causal-conv1d ship no wheels on PyPI: without them the SSD and short-convolution fast paths
report "not installed" and the torch path is used.) Then: ``python scripts/gpu_check.py --wheels wheels``.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OPTIONAL_KERNELS = ("fla", "mamba_ssm", "causal_conv1d", "mlstm_kernels")
PACKAGES = ("torch", "pytorch-lightning", "transformers", "timm", "hydra-core", "flash-linear-attention",
            "mamba-ssm", "causal-conv1d", "mlstm_kernels", "triton")
TINY_TEXT = ["teacher=tiny_bert", "logger=none", "print_config=false", "trainer.enable_progress_bar=false",
             "trainer.max_steps=6", "teacher.finetune.trainer.max_steps=4", "data.module.limit_train_examples=128",
             "data.module.limit_eval_examples=64", "data.module.batch_size=16", "data.module.max_length=64",
             "save_student=false"]
TINY_LM = ["task=subquadratic", "teacher=tiny_llama", "data=lm_bbc", "callbacks=none", "trainer.max_steps=-1",
           "trainer.enable_progress_bar=false", "logger=none", "data.max_train_tokens=3000", "data.block_size=64",
           "data.batch_size=4", "task.stages.splits=0.3|0.3|0.4", "task.evaluation.max_blocks=2",
           "task.evaluation.throughput={}", "task.evaluation.passkey.context_tokens=[128]",
           "task.evaluation.passkey.trials=1", "task.evaluation.mqar.trials=1", "optimized_metric=null",
           "task.save_student=false", "decomposition=mpo"]
# (name, overrides) of the CLI jobs of steps 3 and 4; each runs with the GPU trainer in bf16-mixed.
JOBS = [
    ("text distillation, MPO + alignment", ["trainer=gpu", *TINY_TEXT, "decomposition=mpo", "task.variants=null",
                                            "decomposition.align.weight=1e-3"]),
    ("timm ViT, MPO", ["+experiment=vision_cpu", "trainer=gpu", "logger=none", "print_config=false",
                       "trainer.max_steps=6", "teacher.finetune.trainer.max_steps=6",
                       "data.module.limit_train_examples=256", "task.variants.kd=null", "task.variants.kd_svd=null"]),
    ("subquadratic stages, GLA", ["trainer=gpu", *TINY_LM, "student=subquadratic/gla"]),
    ("subquadratic stages, Gated DeltaNet", ["trainer=gpu", *TINY_LM, "student=subquadratic/gated_deltanet"]),
    ("geometry toy study", ["+experiment=geometric_toy_smoke", "trainer=gpu", "task.train.steps=40",
                            "task.eval.samples=1024", "logger=none"]),
    ("FSDP on one device, MPO", ["trainer=fsdp", "trainer.devices=1", *TINY_TEXT, "decomposition=mpo",
                                 "task.variants=null"]),
]


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, float, str]] = []
        self.sections: list[str] = []

    def step(self, name: str, fn, *args, **kwargs):
        started = time.perf_counter()
        try:
            detail = fn(*args, **kwargs) or ""
            status = "ok"
        except Exception as error:  # a failed step is a result: record it and go on
            detail, status = f"{type(error).__name__}: {' '.join(str(error).split())[:400]}", "FAILED"
        seconds = time.perf_counter() - started
        self.rows.append((name, status, seconds, str(detail)))
        print(f"[gpu-check] {status:6s} {seconds:7.1f} s  {name}: {str(detail)[:200]}", flush=True)
        return status == "ok"

    def markdown(self, title: str) -> str:
        lines = [f"# {title}", "", f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`", "",
                 "| step | status | seconds | result |", "|---|---|---|---|"]
        lines += [f"| {n} | {s} | {t:.1f} | {d.replace('|', '/')} |" for n, s, t, d in self.rows]
        return "\n".join(lines + [""] + self.sections) + "\n"


def versions() -> str:
    import torch

    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"Python {platform.python_version()}, CUDA {torch.version.cuda}, {gpu}; "
            + ", ".join(f"{k} {v}" for k, v in found.items()))


def _run(command: list[str], timeout: int, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", **(env or {})})
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"exit {result.returncode}: {' / '.join(tail)}")
    return result


def gpu_tests() -> str:
    result = _run([sys.executable, "-m", "pytest", "-q", "tests/test_gpu.py", "-p", "no:cacheprovider"], 240)
    return result.stdout.strip().splitlines()[-1]


def cli_job(overrides: list[str], out: Path) -> str:
    _run([sys.executable, "-m", "opdf_exp", *overrides, f"hydra.run.dir={out}"], 180)
    payload = json.loads((out / "results.json").read_text())
    metrics = payload["metrics"]
    bad = [k for k, v in metrics.items() if isinstance(v, float) and v != v]
    if bad:
        raise RuntimeError(f"non-finite metrics: {bad}")
    shown = {k: round(v, 4) for k, v in list(metrics.items())[:4] if isinstance(v, (int, float))}
    return f"finite; {shown}; {payload['wall_time_s']} s"


def fast_paths() -> str:
    """Each mixer on CUDA: fused kernel (when installed) against the torch chunked path, float32 and bf16."""
    import torch

    sys.path.insert(0, str(REPO))
    from opdf_exp.mixers import list_mixers
    from tests.test_mixers import build, grads, inputs, rel

    lines = ["## Fused kernels against the torch chunked path (CUDA)", "",
             "| mixer | dtype | output rel. error | worst final-state rel. error | input-grad rel. error | "
             "worst parameter-grad rel. error |", "|---|---|---|---|---|---|"]
    for name in list_mixers():
        for dtype in (torch.float32, torch.bfloat16):
            mixer = build(name, {}).cuda().to(dtype)
            x = inputs(2, 256).cuda().to(dtype)
            states = {}
            for fast in ("0", "1"):
                os.environ["OPDF_MIXERS_FAST"] = fast
                with torch.no_grad():
                    states[fast] = mixer(x, output_final_state=True)[1]
            os.environ["OPDF_MIXERS_FAST"] = "0"
            y_ref, gx_ref, gp_ref = grads(mixer, x, mixer)
            os.environ["OPDF_MIXERS_FAST"] = "1"
            y, gx, gp = grads(mixer, x, mixer)
            worst = max((rel(gp[n].float(), gp_ref[n].float()) for n in gp_ref if n in gp), default=0.0)
            state_err = max((rel(states["1"][k].float(), states["0"][k].float()) for k in states["0"]), default=0.0)
            lines.append(f"| {name} | {str(dtype)[6:]} | {rel(y.float(), y_ref.float()):.2e} | {state_err:.2e} | "
                         f"{rel(gx.float(), gx_ref.float()):.2e} | {worst:.2e} |")
    REPORT.sections.append("\n".join(lines) + "\n")
    kernels = {m: importlib.util.find_spec(m) is not None for m in OPTIONAL_KERNELS}
    return "fused packages: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in kernels.items())


def mixer_throughput(lengths=(2048, 8192, 32768), hidden: int = 576, heads: int = 9, repeats: int = 3,
                     device: str = "cuda") -> str:
    """Forward+backward tokens/s (batch 1, bf16) of each mixer layer (its fused kernel when installed) against an
    attention layer of the same width: q/k/v/o projections + ``scaled_dot_product_attention(is_causal=True)``
    (flash on CUDA). Every model at every T gets one warm-up, then the best of ``repeats`` timed runs."""
    import torch
    import torch.nn.functional as F

    from opdf_exp.mixers import create_mixer, list_mixers

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.o = torch.nn.Linear(hidden, 3 * hidden, bias=False), torch.nn.Linear(hidden, hidden,
                                                                                                 bias=False)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(x).view(b, t, 3, heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, d)
            return self.o(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1))

    os.environ["OPDF_MIXERS_FAST"] = "1"
    models = {"attention (SDPA)": Attention(), **{name: create_mixer(name, hidden, heads) for name in list_mixers()}}
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    lines = ["## Forward+backward tokens/s of one layer, batch 1, bf16 (CUDA)", "",
             "| layer | " + " | ".join(f"T = {t:,}" for t in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for name, model in models.items():
        model = model.to(device=device, dtype=dtype)
        cells = []
        for t in lengths:
            try:
                x = torch.randn(1, t, hidden, device=device, dtype=dtype, requires_grad=True)
                best = float("inf")
                for i in range(repeats + 1):
                    sync()
                    started = time.perf_counter()
                    model(x).float().pow(2).mean().backward()
                    sync()
                    if i:
                        best = min(best, time.perf_counter() - started)
                cells.append(f"{t / best:,.0f}")
            except torch.cuda.OutOfMemoryError:
                cells.append("OOM")
            if device == "cuda":
                torch.cuda.empty_cache()
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    REPORT.sections.append("\n".join(lines) + "\n")
    return f"{len(models)} layers x {len(lengths)} lengths"


def _bert_student(config, n: int | None, device: str):
    """A randomly initialised BERT student, MPO-decomposed (order n) on its attention and MLP matrices or dense."""
    import torch
    from transformers import BertForSequenceClassification

    sys.path.insert(0, str(REPO))
    from opdf_exp.mpo import apply_decomposition

    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    if n:
        apply_decomposition(model, kind="mpo", n=n, targets=["*.attention.*.query", "*.attention.*.key",
                                                               "*.attention.*.value", "*.attention.output.dense",
                                                               "*.intermediate.dense", "*.output.dense"])
    return model.to(device)


def opdf_overhead(token_counts=(1024, 4096, 16384), repeats: int = 10, device: str = "cuda", hidden: int = 768,
                  heads: int = 12, layers: int = 6, length: int = 512) -> str:
    """Median train-step time of an MPO student (n = 2, 3, 5) over the dense one on the same batch, bf16-mixed,
    for a 6-layer BERT-base-width student at each number of tokens per step (issue 17)."""
    import torch
    from transformers import BertConfig

    config = BertConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=4 * hidden,
                        num_hidden_layers=layers, max_position_embeddings=max(512, length))

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def step_ms(n: int | None, tokens: int) -> float:
        model = _bert_student(config, n, device)
        batch = max(tokens // length, 1)
        ids = torch.randint(0, config.vocab_size, (batch, length), device=device)
        labels = torch.randint(0, 2, (batch,), device=device)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        times = []
        for i in range(repeats + 3):
            sync()
            started = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            if i >= 3:
                times.append((time.perf_counter() - started) * 1e3)
        return sorted(times)[len(times) // 2]

    lines = ["| tokens per step | dense step (ms) | n = 2 | n = 3 | n = 5 |", "|---|---|---|---|---|"]
    for tokens in token_counts:
        dense = step_ms(None, tokens)
        ratios = {n: step_ms(n, tokens) / dense for n in (2, 3, 5)}
        lines.append(f"| {tokens} | {dense:.1f} | " + " | ".join(f"{r:.2f}x" for r in ratios.values()) + " |")
    REPORT.sections.append(f"## OPDF step overhead, bf16-mixed, {layers}-layer BERT (hidden {hidden}), {device}\n\n"
                           + "\n".join(lines) + "\n")
    return "; ".join(line.split(" | ")[0].strip("| ") + " tokens: " + " ".join(line.split(" | ")[2:]).strip(" |")
                     for line in lines[2:])


def opdf_step_cuda_vs_cpu(device: str = "cuda", hidden: int = 768, heads: int = 12, layers: int = 6,
                          batch: int = 4, length: int = 128) -> str:
    """One float32 AdamW step of the same MPO student (n = 5) on ``device`` and on the CPU, from the same weights
    and batch: the loss and the largest difference of any updated parameter (issue 17)."""
    import torch
    from transformers import BertConfig

    config = BertConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=4 * hidden,
                        num_hidden_layers=layers, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (batch, length))
    labels = torch.randint(0, 2, (batch,))
    results = {}
    for where in ("cpu", device):
        model = _bert_student(config, 5, where).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=False)
        loss = model(input_ids=ids.to(where), labels=labels.to(where)).loss
        loss.backward()
        optimizer.step()
        results[where] = (float(loss.detach()), {k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    (cpu_loss, cpu_state), (dev_loss, dev_state) = results["cpu"], results[device]
    worst = max(float((cpu_state[k] - dev_state[k]).abs().max()) for k in cpu_state)
    text = f"loss {cpu_loss:.6f} (cpu) vs {dev_loss:.6f} ({device}); largest parameter difference after the step {worst:.2e}"
    REPORT.sections.append(f"## One float32 OPDF training step, {device} against CPU\n\n{text}\n")
    return text


def dry_run() -> int:
    """Without a GPU: every job composes and passes the config checks, the GPU tests collect, the helpers import."""
    from opdf_exp.runner.cli import validate_overrides

    problems = 0
    for name, overrides in JOBS:
        try:
            validate_overrides(["--cfg", "job", *overrides])  # a print: the machine check is the GPU node's
            print(f"[dry-run] ok      would run: python -m opdf_exp {' '.join(overrides)}")
        except Exception as error:
            problems += 1
            print(f"[dry-run] FAILED  {name}: {error}")
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/test_gpu.py",
                                "-p", "no:cacheprovider"], cwd=REPO, capture_output=True, text=True)
    count = sum(1 for line in collected.stdout.splitlines() if "::" in line)
    print(f"[dry-run] {'ok' if collected.returncode == 0 and count else 'FAILED'}      tests/test_gpu.py: "
          f"{count} tests collected")
    problems += collected.returncode != 0 or count == 0
    sys.path.insert(0, str(REPO))
    from opdf_exp.mixers import list_mixers
    from tests.test_mixers import build  # noqa: F401  (the fast-path step's helpers)

    mixer_throughput(lengths=(64,), hidden=48, heads=4, repeats=1, device="cpu")  # the steps themselves, tiny, on CPU
    opdf_overhead(token_counts=(64,), repeats=1, device="cpu", hidden=48, heads=4, layers=2, length=32)
    opdf_step_cuda_vs_cpu(device="cpu", hidden=48, heads=4, layers=2, batch=2, length=16)
    REPORT.sections.clear()
    print(f"[dry-run] ok      fused-kernel comparison over {len(list_mixers())} mixers (outputs, final states, "
          "gradients); tokens/s of each mixer vs SDPA at T = 2k, 8k, 32k; OPDF overhead at 1k, 4k, 16k tokens, "
          "n = 2, 3, 5; one float32 OPDF step on CUDA against CPU")
    print(f"[dry-run] {'all steps compose' if not problems else f'{problems} problem(s)'}")
    return 1 if problems else 0


REPORT = Report()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="compose every step without a GPU and say what runs")
    parser.add_argument("--wheels", default=None, help="folder of wheels to install first (no network there)")
    parser.add_argument("--out", default=str(REPO / "gpu_report.md"))
    args = parser.parse_args(argv)
    if args.dry_run:
        return dry_run()
    if args.wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", args.wheels,
                        "--no-deps", *map(str, Path(args.wheels).glob("*.whl"))], check=False)
    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA device is visible; run with --dry-run on a machine without a GPU", file=sys.stderr)
        return 2
    started = time.perf_counter()
    REPORT.step("versions", versions)
    REPORT.step("tests/test_gpu.py", gpu_tests)
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, overrides) in enumerate(JOBS):
            REPORT.step(f"job: {name}", cli_job, overrides, Path(tmp) / str(index))
    REPORT.step("fused kernels vs chunked torch kernels", fast_paths)
    REPORT.step("mixer layers vs SDPA attention, tokens/s", mixer_throughput)
    REPORT.step("OPDF step overhead at 1k, 4k, 16k tokens", opdf_overhead)
    REPORT.step("one float32 OPDF step, CUDA vs CPU", opdf_step_cuda_vs_cpu)
    REPORT.sections.append(f"Total {time.perf_counter() - started:.0f} s.")
    Path(args.out).write_text(REPORT.markdown("GPU check"))
    print(f"[gpu-check] report written to {args.out}")
    return 0 if all(status == "ok" for _, status, _, _ in REPORT.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
