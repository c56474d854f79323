"""Tokenize :class:`~opdf_exp.data.sources.TextSplits` once and serve padded batches to Lightning."""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import Dataset

from opdf_exp.data.module import ClassificationDataModule, ResumableRandomSampler  # noqa: F401  (re-exported)
from opdf_exp.data.sources import SPLITS, TextSplits
from opdf_exp.hub import resolve_model_path


class _Encoded(Dataset):
    def __init__(self, encodings: dict[str, list], labels: list, regression: bool):
        self.encodings = encodings
        self.labels = torch.tensor(labels, dtype=torch.float32 if regression else torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        item = {key: values[index] for key, values in self.encodings.items()}
        item["labels"] = self.labels[index]
        item["example_index"] = index  # the key of cached teacher outputs (opdf_exp.distill.teacher_cache)
        return item


class TextClassificationDataModule(ClassificationDataModule):
    """Tokenizes every split at ``setup`` and pads each batch dynamically (to a multiple of 8 for tensor cores).

    ``source`` is a zero-argument callable returning :class:`TextSplits` (a ``functools.partial`` from the config),
    so the raw-data layer stays independent of tokenization. ``limit_train_examples`` caps the training split
    (for quick runs); evaluation splits are never truncated silently. Extra test sets of the source
    (``TextSplits.extra_test``) become further test loaders, named by :attr:`test_set_names`.
    """

    def __init__(self, source: Callable[[], TextSplits], tokenizer: str, max_length: int = 128,
                 batch_size: int = 32, eval_batch_size: int | None = None, num_workers: int = 0,
                 limit_train_examples: int | None = None, limit_eval_examples: int | None = None,
                 pad_to_multiple_of: int | None = 8):
        super().__init__(batch_size, eval_batch_size, num_workers, limit_train_examples, limit_eval_examples)
        self.source = source
        self.tokenizer_path = tokenizer
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.datasets: dict[str, _Encoded] = {}
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                resolve_model_path(self.tokenizer_path, override_key="data.tokenizer"))
        return self._tokenizer

    def input_signature(self) -> dict:
        """What fixes the model inputs of an example (the teacher-output cache key): tokenizer and max length."""
        return {"tokenizer": str(self.tokenizer_path), "max_length": int(self.max_length)}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        splits = self.load_splits()
        regression = splits.problem_type == "regression"
        for name in (*SPLITS, *splits.extra_test):
            part = splits.split(name)
            encodings = self.tokenizer(part.text_a, part.text_b, truncation=True, max_length=self.max_length)
            self.datasets[name] = _Encoded(dict(encodings), part.labels, regression)

    def _collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        labels = torch.stack([item.pop("labels") for item in items])
        index = torch.tensor([item.pop("example_index") for item in items], dtype=torch.long)
        batch = self.tokenizer.pad(items, padding=True, pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt")
        batch = dict(batch)
        batch["labels"] = labels
        batch["example_index"] = index
        return batch

