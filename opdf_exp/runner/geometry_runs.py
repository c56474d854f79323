"""End-to-end geometry experiments from plain parameter dicts (no Hydra, no DictConfig).

:func:`run_toy_experiment` (the 48-config toy study) and :func:`run_floor_experiment` (teacher -> SAE ->
width-swept students -> calibrated fit -> probes) write every artifact into ``output_dir`` and return
``{"metrics", "params", "tables"}`` as the runner expects. ``opdf_exp.runner.geometry_tasks`` adapts Hydra configs to them
and passes ``make_trainer``, the job's stage-Trainer factory (the runner's one builder), so the studies log to the
job's loggers (W&B included) like every other task.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from opdf_exp.errors import ConfigError
from opdf_exp.geometry import theory
from opdf_exp.utils.io import atomic_write_json
from opdf_exp.utils.tables import write_table
from opdf_exp.utils.threads import torch_threads

log = logging.getLogger(__name__)


def finite_metrics(metrics: dict) -> dict[str, float]:
    """Keep the numeric metrics, as floats; NaN stays NaN so that an empty stratum is visible."""
    out = {}
    for key, value in metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out

# ------------------------------------------------------------------------------------------------ parameters
TOY_DEFAULTS: dict[str, Any] = {
    "n_features": [10, 20, 40],
    "alphas": [0.8, 0.9, 0.95, 0.99],
    "teacher_widths": [3, 5, 8, 10],
    "include_teacher_width": False,
    "importance": {"kind": "zipf", "s": 1.0, "base": 0.7},
    "seeds": 1,
    "controls": True,
    "train": {"steps": 3000, "student_steps": None, "batch_size": 256, "lr": 3e-3, "warmup_steps": 0,
              "schedule": "cosine"},
    "eval": {"samples": 65536, "seed": 1234, "chunk": 2048},
    "survival_threshold": 0.5,
    "floor_metric": "task",
    "predictor": "eq2",
    "equilibrium": {"a": 1.03, "b": 0.53, "fit": False},
    "num_threads": 1,
    "plots": True,
}

FLOOR_DEFAULTS: dict[str, Any] = {
    "corpus": {"name": "bbc", "path": None, "max_docs": None, "eval_fraction": 0.15, "split_seed": 0},
    "tokenizer": "byte",
    "seq_len": 128,
    "teacher": {"pretrained": None, "width": 64, "layers": 3, "heads": None, "ffn_mult": 4.0, "rotary_pct": 0.25,
                "train": {"steps": 800, "batch_size": 16, "lr": 3e-3, "betas": [0.9, 0.95], "weight_decay": 0.01,
                          "warmup_steps": None, "eval_every": 100, "eval_batches": 8}},
    "hook": {"layer": 1, "module": None},
    "sae": {"kind": "topk", "n_latents": 512, "expansion": None, "k": 16, "l1_coeff": 1e-3, "aux_k": 0,
            "aux_coeff": 0.03125, "dead_after_tokens": 100000, "steps": 1000, "batch_size": 2048, "lr": 3e-3,
            "warmup_steps": 0, "normalize": True, "alive_threshold": 1e-5, "n_tokens": 200000},
    "students": {"widths": [8, 16, 32, 48, 64], "layers": None, "temperature": 2.0, "floor_tail": 0.1,
                 "train": {"steps": 400, "batch_size": 16, "lr": 3e-3, "betas": [0.9, 0.95], "weight_decay": 0.01,
                           "warmup_steps": None, "eval_every": 40, "eval_batches": 8}},
    "fit": {"primary": "ols"},
    "probe": {"enabled": True, "docs": "all", "windows_per_doc": 1, "token_windows": 600, "n_fine": 6, "n_blocks": 3,
              "block_size": 32, "max_per_class": 1000, "min_rate": 0.002},
    "num_threads": 1,
    "plots": True,
}


def merge_params(defaults: dict, given: dict | None, prefix: str = "task") -> dict:
    """Deep-merge ``given`` into a copy of ``defaults``; unknown keys raise a one-line ConfigError."""
    out = copy.deepcopy(defaults)
    for key, value in (given or {}).items():
        if key not in defaults:
            raise ConfigError(f"unknown option {prefix}.{key}; known options: {', '.join(sorted(defaults))}")
        if isinstance(defaults[key], dict) and isinstance(value, dict):
            out[key] = merge_params(defaults[key], value, f"{prefix}.{key}")
        else:
            out[key] = value
    return out


def _seed_list(seeds, base: int) -> list[int]:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ConfigError(f"seeds={seeds} must be >= 1 (a count) or a list of seeds")
        return [base + i for i in range(seeds)]
    return [int(s) for s in seeds]


# ------------------------------------------------------------------------------------------------- toy study
def _write_toy_tables(rows: list[dict], summaries: dict, predictor: str, sweep, out: Path) -> dict[str, str]:
    """The toy study's tables (floors per model, accuracy by alpha, R2 by stratum, d* per n), as .csv/.md in
    ``out``; returns the markdown of those shown in the job's summary."""
    tables: dict[str, str] = {}
    columns = ["n", "alpha", "d_T", "d_S", "seeds", "d_star", "d_over_dstar", "stratum", "kept_eq2",
               "kept_equilibrium", "kept_measured", "observed", "observed_std", "eq2", "naive", "equilibrium",
               "measured_kept", "teacher_loss", "distill_loss", "control_loss", "capacity_used", "l_zero"]
    write_table(rows, out / "toy_floors", columns, digits=5)
    first_columns = ["n", "alpha", "d_T", "d_S", "observed", "eq2", "equilibrium", "measured_kept", "kept_eq2",
                     "kept_measured"]
    tables["toy_floors (first rows; full table in toy_floors.csv)"] = write_table(rows[:12], out / "toy_floors_head",
                                                                                  first_columns, digits=4)
    acc_rows = []
    head = summaries[predictor]
    for metric, label in (("ratio", "min(p,o)/max(p,o)"), ("normalized", "1-|p-o|/L_zero"),
                          ("pearson_config", "Pearson r per config")):
        row = {"metric (median over configs)": label}
        for alpha, values in head["by_alpha"].items():
            row[f"alpha={alpha:g}"] = values[metric]
        acc_rows.append(row)
    tables[f"toy_accuracy ({predictor})"] = write_table(acc_rows, out / "toy_accuracy", digits=3)
    strata_rows = []
    for name, s in summaries.items():
        pooled = s["pooled"]
        strata_rows.append({"predictor": name, "R2_abs overall": pooled["r2_abs"], "below": pooled["r2_abs_below"],
                            "near": pooled["r2_abs_near"], "above": pooled["r2_abs_above"],
                            "Pearson r": pooled["pearson"], "R2 affine (OLS)": pooled["r2_affine"],
                            "median r per config": pooled["pearson_config_median"]})
    tables["toy_r2_by_stratum"] = write_table(strata_rows, out / "toy_r2_by_stratum", digits=3)
    dstar_rows = [{"n": n, **{f"alpha={a_:g}": theory.critical_width(n, a_) for a_ in sweep.alphas}}
                  for n in sweep.n_features]
    tables["toy_dstar"] = write_table(dstar_rows, out / "toy_dstar", digits=2)
    return tables


def run_toy_experiment(params: dict | None, output_dir: str | Path, seed: int = 0, *, make_trainer) -> dict:
    from opdf_exp.geometry import toy
    from opdf_exp.lit import geometry as train_toy

    p = merge_params(TOY_DEFAULTS, params)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if p["predictor"] not in toy.PREDICTORS:
        raise ConfigError(f"task.predictor={p['predictor']} is unknown; use one of {', '.join(toy.PREDICTORS)}")
    if p["floor_metric"] not in toy.FLOOR_METRICS:
        raise ConfigError(f"task.floor_metric={p['floor_metric']} is unknown; use one of {', '.join(toy.FLOOR_METRICS)}")
    started = time.perf_counter()
    sweep = toy.ToySweep(n_features=list(p["n_features"]), alphas=list(p["alphas"]),
                         teacher_widths=list(p["teacher_widths"]), seeds=_seed_list(p["seeds"], seed),
                         importance=dict(p["importance"]), include_teacher_width=bool(p["include_teacher_width"]),
                         controls=bool(p["controls"]))
    tr, ev = p["train"], p["eval"]
    cfg = toy.ToyTrainConfig(steps=int(tr["steps"]), student_steps=tr["student_steps"], batch_size=int(tr["batch_size"]),
                             lr=float(tr["lr"]), warmup_steps=int(tr["warmup_steps"]), schedule=str(tr["schedule"]),
                             eval_samples=int(ev["samples"]), eval_seed=int(ev["seed"]), eval_chunk=int(ev["chunk"]),
                             survival_threshold=float(p["survival_threshold"]))
    log.info("toy sweep: %d models (%d configs x seeds %s), %d steps per phase", len(sweep.models),
             len(sweep.n_features) * len(sweep.alphas) * len(sweep.teacher_widths), sweep.seeds, cfg.steps)
    run = train_toy.run_toy_sweep(sweep, cfg, seed=seed, num_threads=p["num_threads"], make_trainer=make_trainer)
    log.info("toy sweep trained: %s", {k: round(v, 1) for k, v in run.timings.items()})
    fitted = toy.fitted_packing_law(run)
    eq = p["equilibrium"]
    a, b = (fitted if (eq["fit"] and fitted) else (float(eq["a"]), float(eq["b"])))
    rows = toy.floor_rows(run, p["floor_metric"], (a, b))
    n_configs = len({(r["n"], r["alpha"], r["d_T"]) for r in rows})
    summaries = {name: toy.accuracy_summary(rows, name) for name in toy.PREDICTORS}
    head = summaries[p["predictor"]]
    wall = time.perf_counter() - started

    tables = _write_toy_tables(rows, summaries, p["predictor"], sweep, out)

    figures = {}
    if p["plots"]:
        from opdf_exp.geometry import plots

        figures["floor_vs_width"] = str(plots.plot_toy_floors(rows, out / "toy_floor_vs_width.png", p["predictor"]))
        stats = {k: v["pooled"] for k, v in summaries.items()}
        figures["pred_vs_obs"] = str(plots.plot_pred_vs_obs(rows, out / "toy_pred_vs_obs.png",
                                                            ("eq2", "equilibrium", "measured_kept"), stats))
    pooled = head["pooled"]
    metrics = {
        "n_configs": n_configs, "n_points": len(rows), "n_models": len(sweep.models),
        "pearson_r": pooled["pearson"], "r2_abs": pooled["r2_abs"], "r2_affine": pooled["r2_affine"],
        "r2_abs_below": pooled["r2_abs_below"], "r2_abs_near": pooled["r2_abs_near"],
        "r2_abs_above": pooled["r2_abs_above"], "pearson_config_median": pooled["pearson_config_median"],
        "accuracy_ratio_median": pooled["ratio_median"], "accuracy_normalized_median": pooled["normalized_median"],
        "wall_time_s": wall, **{f"time_{k}": v for k, v in run.timings.items()},
    }
    for alpha, values in head["by_alpha"].items():
        for key, value in values.items():
            metrics[f"{key}_alpha{alpha:g}"] = value
    for name, s in summaries.items():
        if name != p["predictor"]:
            metrics[f"{name}_r2_abs"] = s["pooled"]["r2_abs"]
            metrics[f"{name}_pearson_r"] = s["pooled"]["pearson"]
    params_out = {"predictor": p["predictor"], "floor_metric": p["floor_metric"], "importance": p["importance"],
                  "seeds": sweep.seeds, "train": p["train"], "equilibrium_ab": [a, b],
                  "fitted_packing_law_ab": list(fitted) if fitted else None, "num_threads": p["num_threads"]}
    atomic_write_json(out / "toy_summary.json", {"metrics": metrics, "params": params_out, "figures": figures,
                                         "summaries": summaries})
    return {"metrics": finite_metrics(metrics), "params": params_out, "tables": tables, "figures": figures}


# ----------------------------------------------------------------------------------------- LM width sweep
def _load_corpus(c: dict):
    from opdf_exp.geometry import distill_lm

    if c["name"] == "bbc":
        docs = distill_lm.load_bbc(c["max_docs"])
        return docs, list(distill_lm.BBC_LABELS)
    if c["name"] == "folder":
        return _load_folder(c["path"], c["max_docs"])
    raise ConfigError(f"task.corpus.name={c['name']} is unknown; use bbc or folder (with task.corpus.path)")


def _load_folder(path, max_docs):
    from opdf_exp.errors import MissingFileError
    from opdf_exp.geometry.distill_lm import Document

    if not path or not Path(path).is_dir():
        raise MissingFileError(f"task.corpus.path={path!r} is not a folder; point it at a folder of .txt files")
    root = Path(path)
    subdirs = sorted(d for d in root.iterdir() if d.is_dir())
    groups = subdirs or [root]
    docs = []
    for label, folder in enumerate(groups):
        for f in sorted(folder.rglob("*.txt")):
            docs.append(Document(f.read_text(errors="replace").strip(), label, str(f.relative_to(root))))
    if not docs:
        raise MissingFileError(f"no .txt files under {root}")
    return docs[:max_docs] if max_docs else docs, [g.name for g in groups]


def _device(accelerator: str) -> str:
    """Where the non-Lightning passes (activation collection, SAE measurement, probes) run."""
    if str(accelerator) in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return "cuda"
    return "cpu"


@dataclass
class _FloorCorpus:
    """The tokenised corpus of a floor study: training and held-out windows (N, seq_len), the documents and their
    topic names for the probes."""
    tokenizer: Any
    docs: list
    held_docs: list
    label_names: list[str]
    train_windows: torch.Tensor
    eval_windows: torch.Tensor


def _check_floor_params(p: dict) -> list[int]:
    """The student widths, after the checks that need no model (one line each)."""
    widths = [int(w) for w in theory.check_widths(list(p["students"]["widths"]))]
    if len(widths) < 2 or min(widths) < 1:
        raise ConfigError(f"task.students.widths={widths} needs at least two widths >= 1")
    if p["fit"]["primary"] not in theory.FIT_MODES:
        raise ConfigError(f"task.fit.primary={p['fit']['primary']} is unknown; use one of {', '.join(theory.FIT_MODES)}")
    if p["tokenizer"] == "teacher" and not p["teacher"]["pretrained"]:
        raise ConfigError("task.tokenizer=teacher needs task.teacher.pretrained; use tokenizer=byte or minilm for a "
                          "teacher trained here")
    if p["probe"]["enabled"] and p["probe"]["docs"] not in ("all", "heldout"):
        raise ConfigError(f"task.probe.docs={p['probe']['docs']} is unknown; use all or heldout")
    return widths


def _lm_train_config(section: dict, trainer: dict):
    from opdf_exp.geometry import distill_lm as lm

    return lm.LMTrainConfig(steps=int(section["steps"]), batch_size=int(section["batch_size"]), lr=float(section["lr"]),
                            betas=tuple(section["betas"]), weight_decay=float(section["weight_decay"]),
                            warmup_steps=section["warmup_steps"], eval_every=int(section["eval_every"]),
                            eval_batches=int(section["eval_batches"]), eval_batch_size=int(section["batch_size"]),
                            accelerator=trainer["accelerator"], precision=str(trainer["precision"]),
                            devices=trainer["devices"])


def _floor_corpus(p: dict, pretrained_teacher) -> _FloorCorpus:
    """Tokenizer (the pretrained teacher's unless another is named) and the packed windows of both splits."""
    from opdf_exp.geometry import distill_lm as lm

    if pretrained_teacher is not None:
        tokenizer = lm.build_tokenizer(p["teacher"]["pretrained"] if p["tokenizer"] in ("teacher", None)
                                       else p["tokenizer"])
    else:
        tokenizer = lm.build_tokenizer(p["tokenizer"])
    docs, label_names = _load_corpus(p["corpus"])
    train_docs, held_docs = lm.split_documents(docs, p["corpus"]["eval_fraction"], p["corpus"]["split_seed"])
    seq_len = int(p["seq_len"])
    return _FloorCorpus(tokenizer, docs, held_docs, label_names,
                        lm.pack_windows(lm.encode_stream(train_docs, tokenizer), seq_len),
                        lm.pack_windows(lm.encode_stream(held_docs, tokenizer), seq_len))


def _train_floor_teacher(p: dict, corpus: _FloorCorpus, trainer: dict, seed: int, make_trainer) -> tuple[Any, list]:
    """A small GPT-NeoX teacher trained here on the corpus (when no pretrained one is named); its history."""
    from opdf_exp.geometry import distill_lm as lm
    from opdf_exp.lit import geometry as lit_geometry

    t, seq_len = p["teacher"], int(p["seq_len"])
    cfg_t = lm.neox_config(corpus.tokenizer.vocab_size, int(t["width"]), int(t["layers"]), t["heads"],
                           float(t["ffn_mult"]), float(t["rotary_pct"]), max(seq_len, 128),
                           corpus.tokenizer.eos_token_id)
    teacher = lm.build_neox(cfg_t, seed)
    module = lit_geometry.CausalLMModule(teacher, lr=float(t["train"]["lr"]), betas=tuple(t["train"]["betas"]),
                                         weight_decay=float(t["train"]["weight_decay"]))
    history = lit_geometry.fit_lm(module, corpus.train_windows, corpus.eval_windows,
                                  _lm_train_config(t["train"], trainer), seed, make_trainer, "teacher")
    return teacher, history


def _measure_teacher_features(p: dict, teacher, hook: str, corpus: _FloorCorpus, seed: int, device: str,
                              make_trainer):
    """Train the SAE on the hooked layer's activations over ``sae.n_tokens`` training tokens and measure the
    feature count F, importances and alpha that the floor prediction (Eq. 2) needs. Returns (sae, scale, meas)."""
    from opdf_exp.geometry import sae as sae_mod
    from opdf_exp.lit import geometry as lit_geometry

    s, seq_len = p["sae"], int(p["seq_len"])
    windows = corpus.train_windows
    n_windows = min(windows.shape[0], int(np.ceil(int(s["n_tokens"]) / seq_len)))
    pick = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed))[:n_windows]
    acts = sae_mod.collect_activations(teacher, hook, (windows[pick[i:i + 32]] for i in range(0, n_windows, 32)),
                                       max_tokens=int(s["n_tokens"]), device=device)
    teacher.cpu()
    sae_cfg = sae_mod.SAETrainConfig(kind=s["kind"], n_latents=int(s["n_latents"]), expansion=s["expansion"],
                                     k=int(s["k"]), l1_coeff=float(s["l1_coeff"]), aux_k=int(s["aux_k"]),
                                     aux_coeff=float(s["aux_coeff"]), dead_after_tokens=int(s["dead_after_tokens"]),
                                     steps=int(s["steps"]), batch_size=int(s["batch_size"]), lr=float(s["lr"]),
                                     warmup_steps=int(s["warmup_steps"]), normalize=bool(s["normalize"]),
                                     alive_threshold=float(s["alive_threshold"]), seed=seed)
    sae, scale = lit_geometry.train_sae(acts, sae_cfg, make_trainer)
    return sae, scale, sae_mod.measure(sae, acts, scale, sae_cfg.alive_threshold, device=device)


def _train_width_students(p: dict, teacher, widths: list[int], meas, corpus: _FloorCorpus, trainer: dict,
                          seed: int, make_trainer) -> tuple[list[dict], dict, dict]:
    """One KD student per width (seed + width), each with its observed floor beside the predicted one. Returns
    (rows, histories by model name, students by width)."""
    from opdf_exp.geometry import distill_lm as lm
    from opdf_exp.lit import geometry as lit_geometry

    t, st = p["teacher"], p["students"]
    layers = int(st["layers"] or teacher.config.num_hidden_layers)
    predicted, kept = meas.predicted_floors(widths), meas.kept(widths)
    rows, histories, students = [], {}, {}
    for i, w in enumerate(widths):
        clock = time.perf_counter()
        cfg_s = lm.neox_config(int(teacher.config.vocab_size), w, layers, None, float(t["ffn_mult"]),
                               float(t["rotary_pct"]), max(int(p["seq_len"]), 128), corpus.tokenizer.eos_token_id)
        student = lm.build_neox(cfg_s, seed + w)
        module = lit_geometry.KDModule(student, teacher, float(st["temperature"]), lr=float(st["train"]["lr"]),
                                       betas=tuple(st["train"]["betas"]),
                                       weight_decay=float(st["train"]["weight_decay"]))
        history = lit_geometry.fit_lm(module, corpus.train_windows, corpus.eval_windows,
                                      _lm_train_config(st["train"], trainer), seed + w, make_trainer, f"student_{w}")
        teacher.eval().requires_grad_(False)
        histories[f"student_{w}"] = history
        students[w] = student.eval()
        tail = float(st["floor_tail"])
        rows.append({"width": w, "params": lm.count_parameters(student), "heads": cfg_s.num_attention_heads,
                     "kept": int(kept[i]), "dropped": meas.n_alive - int(kept[i]), "predicted": float(predicted[i]),
                     "observed": lm.floor_of(history, "kd", tail), "kl_t1": lm.floor_of(history, "kl_t1", tail),
                     "student_ce": lm.floor_of(history, "ce", tail), "time_s": time.perf_counter() - clock})
        log.info("student d=%d: floor %.4f (predicted L* %.4g, kept %d) (%.1f s)", w, rows[-1]["observed"],
                 rows[-1]["predicted"], rows[-1]["kept"], rows[-1]["time_s"])
    return rows, histories, students


def _probe_models(p: dict, models: dict, hook: str, sae, scale, corpus: _FloorCorpus, seed: int,
                  device: str) -> list[dict]:
    """Linear probes on each model's hooked states: coarse concepts (the document topic, blocks of latents) and
    fine ones (single SAE latents of the teacher), one row per model and concept."""
    from opdf_exp.geometry import distill_lm as lm
    from opdf_exp.geometry import probe as probe_mod
    from opdf_exp.geometry import sae as sae_mod

    pr = p["probe"]
    probe_docs = corpus.docs if pr["docs"] == "all" else corpus.held_docs
    windows, labels, owners = lm.document_windows(probe_docs, corpus.tokenizer, int(p["seq_len"]),
                                                  int(pr["windows_per_doc"]))
    token_pick = np.sort(np.random.default_rng(seed).choice(
        windows.shape[0], min(int(pr["token_windows"]), windows.shape[0]), replace=False))
    doc_states, token_states = {}, {}
    for name, model in models.items():
        h = probe_mod.hidden_states(model.to(device), hook, windows, device=device)  # (N, seq_len, d)
        model.cpu()
        doc_states[name] = probe_mod.pool_by_group(h.mean(1), owners)
        token_states[name] = h[torch.as_tensor(token_pick)]
    _, doc_labels = np.unique(owners, return_index=True)
    teacher_states = token_states["teacher"]
    z = sae_mod.latent_codes(sae, teacher_states.reshape(-1, teacher_states.shape[-1]), scale, device=device)
    order = np.argsort(-z.square().mean(0).numpy(), kind="stable")
    concepts = probe_mod.topic_concepts(labels[doc_labels], corpus.label_names) + probe_mod.latent_concepts(
        z, order, int(pr["n_fine"]), int(pr["n_blocks"]), int(pr["block_size"]), float(pr["min_rate"]))
    return probe_mod.run_probes(doc_states, token_states, concepts, seed, int(pr["max_per_class"]))


def _probe_summary(probe_rows: list[dict], teacher_width: int, widths: list[int]) -> list[dict]:
    """Mean probe accuracy per model and concept family (topic, latent block, single latent)."""
    families = {"topic": "coarse_topic", "block": "coarse_block", "latent": "fine_latent"}
    rows = []
    for model in ["teacher"] + [f"student_{w}" for w in widths]:
        row = {"model": model, "width": teacher_width if model == "teacher" else int(model.split("_")[1])}
        for family, column in families.items():
            accs = [r["accuracy"] for r in probe_rows if r["model"] == model
                    and r["concept"].startswith(family + ":") and np.isfinite(r["accuracy"])]
            row[column] = float(np.mean(accs)) if accs else float("nan")
        rows.append(row)
    return rows


def _write_floor_artifacts(p: dict, results: list[dict], observed_predicted: tuple, fits: dict, meas,
                           probe_rows: list[dict], widths: list[int], hook: str, teacher_info: tuple,
                           out: Path) -> tuple[dict, dict, list[dict]]:
    """The floor study's tables, measurement files and plots in ``out``. Returns (tables shown in the job's
    summary, figure paths, probe accuracy per model and concept family)."""
    teacher_width, teacher_layers, teacher_ce = teacher_info
    s = p["sae"]
    obs, pred = observed_predicted
    tables: dict[str, str] = {}
    floor_columns = ["width", "params", "heads", "kept", "dropped", "predicted", "observed", "kl_t1", "student_ce",
                     "time_s"]
    tables["floor_vs_width"] = write_table(results, out / "floor_vs_width", floor_columns, digits=5)
    fit_rows = [{"mode": m, **f.as_dict()} for m, f in fits.items()]
    tables["floor_fit"] = write_table(fit_rows, out / "floor_fit", ["mode", "C", "B", "r2", "n"], digits=4)
    summary = meas.summary()
    summary.update({"hook": hook, "teacher_width": teacher_width, "teacher_layers": teacher_layers,
                    "teacher_eval_ce": teacher_ce, "sae_kind": s["kind"], "sae_k": s["k"], "sae_l1": s["l1_coeff"]})
    tables["sae_measurement"] = write_table([summary], out / "sae_measurement",
                                            ["n_latents", "F_alive", "L0", "alpha", "g_alpha", "d_star", "fvu",
                                             "importance_slope", "top10_share", "n_tokens"], digits=4)
    atomic_write_json(out / "sae_measurement.json", {**summary, "importances": meas.importances.tolist()})
    agg: list[dict] = []
    if probe_rows:
        write_table(probe_rows, out / "probes", digits=3)
        agg = _probe_summary(probe_rows, teacher_width, widths)
        tables["probe_accuracy_vs_width"] = write_table(agg, out / "probe_summary", digits=3)
    figures = {}
    if p["plots"]:
        from opdf_exp.geometry import plots

        figures["floor"] = str(plots.plot_lm_floor(
            widths, obs, pred, {m: f.as_dict() for m, f in fits.items()}, meas.importances, meas.kept(widths),
            meas.d_star, out / "floor_vs_width.png",
            f"KD floors vs Eq. 2 (teacher d={teacher_width}, F={meas.n_alive}, alpha={meas.alpha:.4f}, d*={meas.d_star:.1f})"))
        if probe_rows:
            model_widths = {"teacher": teacher_width, **{f"student_{w}": w for w in widths}}
            figures["probes"] = str(plots.plot_probes(probe_rows, model_widths, out / "probe_accuracy.png"))
    return tables, figures, agg


def run_floor_experiment(params: dict | None, output_dir: str | Path, seed: int = 0, *, make_trainer) -> dict:
    """Teacher -> SAE measurement -> students at every width -> observed vs predicted floors -> probes."""
    from opdf_exp.geometry import distill_lm as lm
    from opdf_exp.geometry import sae as sae_mod

    params = dict(params or {})
    # the job's trainer group (accelerator, precision, devices) decides where models are evaluated
    trainer = params.pop("trainer", None) or {"accelerator": "cpu", "precision": "32-true", "devices": 1}
    p = merge_params(FLOOR_DEFAULTS, params)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    widths = _check_floor_params(p)
    device = _device(trainer["accelerator"])
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with torch_threads(p["num_threads"]):
        # 1. teacher and corpus (a pretrained teacher is resolved first: offline, this fails in a second)
        pretrained = p["teacher"]["pretrained"]
        teacher = lm.load_pretrained_lm(pretrained, override_key="task.teacher.pretrained") if pretrained else None
        corpus = _floor_corpus(p, teacher)
        timings["data_s"] = time.perf_counter() - started
        clock = time.perf_counter()
        teacher_history: list = []
        if teacher is None:
            teacher, teacher_history = _train_floor_teacher(p, corpus, trainer, seed, make_trainer)
        teacher.eval().requires_grad_(False).to(device)
        teacher_width, teacher_layers = int(teacher.config.hidden_size), int(teacher.config.num_hidden_layers)
        teacher_ce = lm.evaluate_lm(teacher, corpus.eval_windows, 16, max_batches=16, device=device)
        timings["teacher_s"] = time.perf_counter() - clock
        log.info("teacher ready: d=%d, %d layers, held-out CE %.4f (%.1f s)", teacher_width, teacher_layers, teacher_ce,
                 timings["teacher_s"])

        # 2. SAE on the hooked layer
        clock = time.perf_counter()
        hook = p["hook"]["module"] or f"gpt_neox.layers.{int(p['hook']['layer'])}"
        sae_mod.resolve_module(teacher, hook)
        sae, scale, meas = _measure_teacher_features(p, teacher, hook, corpus, seed, device, make_trainer)
        timings["sae_s"] = time.perf_counter() - clock
        log.info("SAE on %s: F=%d alive of %d, L0=%.2f, alpha=%.5f, g=%.3f, d*=%.1f, FVU=%.3f (%.1f s)", hook,
                 meas.n_alive, meas.n_latents, meas.l0, meas.alpha, meas.g, meas.d_star, meas.fvu, timings["sae_s"])

        # 3. students
        results, histories, students = _train_width_students(p, teacher, widths, meas, corpus, trainer, seed,
                                                             make_trainer)
        histories = {"teacher": teacher_history, **histories}
        timings["students_s"] = sum(r["time_s"] for r in results)

        # 4. probes
        probe_rows: list[dict] = []
        if p["probe"]["enabled"]:
            clock = time.perf_counter()
            models = {"teacher": teacher, **{f"student_{w}": m for w, m in students.items()}}
            probe_rows = _probe_models(p, models, hook, sae, scale, corpus, seed, device)
            timings["probes_s"] = time.perf_counter() - clock
    wall = time.perf_counter() - started

    # 5. calibration: observed floors against the predicted ones
    obs = np.array([r["observed"] for r in results])
    pred = np.array([r["predicted"] for r in results])
    fits = {mode: theory.fit_floor(pred, obs, mode, widths=widths) for mode in theory.FIT_MODES}
    rho = theory.spearman_rho(pred, obs)
    monotone = bool(np.all(np.diff(obs[np.argsort(widths)]) <= 0))

    # 6. artifacts
    atomic_write_json(out / "histories.json", histories)
    tables, figures, agg = _write_floor_artifacts(p, results, (obs, pred), fits, meas, probe_rows, widths, hook,
                                                  (teacher_width, teacher_layers, teacher_ce), out)
    s, st, fit_primary = p["sae"], p["students"], p["fit"]["primary"]
    primary = fits[fit_primary]
    metrics = {"C": primary.C, "B": primary.B, "r2": primary.r2,
               **{f"{m}_{k}": getattr(f, k) for m, f in fits.items() for k in ("C", "B", "r2")},
               "spearman_rho": rho, "monotone": float(monotone), "F_alive": meas.n_alive, "L0": meas.l0,
               "alpha": meas.alpha, "g_alpha": meas.g, "d_star": meas.d_star, "sae_fvu": meas.fvu,
               "teacher_eval_ce": teacher_ce, "wall_time_s": wall, **{f"time_{k}": v for k, v in timings.items()}}
    for r in results:
        metrics[f"floor_w{r['width']}"] = r["observed"]
        metrics[f"pred_w{r['width']}"] = r["predicted"]
    for row in agg:
        for key in ("coarse_topic", "coarse_block", "fine_latent"):
            metrics[f"probe_{key}_{row['model']}"] = row[key]
    params_out = {"teacher": pretrained or f"gpt_neox d={teacher_width} L={teacher_layers} (trained here)",
                  "tokenizer": getattr(corpus.tokenizer, "name", str(p["tokenizer"])), "hook": hook, "widths": widths,
                  "fit_primary": fit_primary, "sae": s, "temperature": st["temperature"]}
    atomic_write_json(out / "floor_summary.json", {"metrics": metrics, "params": params_out, "figures": figures})
    return {"metrics": finite_metrics(metrics), "params": params_out, "tables": tables, "figures": figures}
