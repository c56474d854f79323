"""The DataModule base every classification source shares: resumable training order, evaluation loaders, one
test loader per named test set. Subclasses (text, images) only say how to build ``datasets`` and collate a batch.
"""
from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Sampler


class ResumableRandomSampler(Sampler[int]):
    """``RandomSampler``'s order (an epoch seed drawn from the global torch RNG, then ``randperm``), plus a way to
    continue an interrupted epoch: :meth:`resume` replays the epoch's seed and skips the batches already trained.

    Why: Lightning restores weights, optimizer, schedule and loop counters from ``last.ckpt``, but a plain
    shuffled DataLoader starts the interrupted epoch over with a new order, so a resumed run sees different data
    than an uninterrupted one. The DataModule saves the epoch seed in every checkpoint (``state_dict``).
    """

    def __init__(self, num_examples: int, batch_size: int):
        self.num_examples, self.batch_size = num_examples, batch_size
        self.epoch_seed: int | None = None
        self._resume: tuple[int, int] | None = None

    def resume(self, epoch_seed: int, batches_done: int) -> None:
        self._resume = (int(epoch_seed), int(batches_done))

    def __len__(self) -> int:
        return self.num_examples

    def __iter__(self):
        if self._resume is not None:
            seed, skip = self._resume
            self._resume = None
        else:
            seed, skip = int(torch.empty((), dtype=torch.int64).random_().item()), 0  # as RandomSampler does
        self.epoch_seed = seed
        generator = torch.Generator()
        generator.manual_seed(seed)
        order = torch.randperm(self.num_examples, generator=generator).tolist()
        yield from order[skip * self.batch_size:]



class ClassificationDataModule(pl.LightningDataModule):
    """Shared loaders. Subclasses set ``datasets`` (``train``, ``validation``, ``test`` and any extra test sets) in
    ``setup``, implement ``load_splits`` and may override ``_collate``; items are dicts with ``labels`` and
    ``example_index`` (the key of cached teacher outputs)."""

    def __init__(self, batch_size: int = 32, eval_batch_size: int | None = None, num_workers: int = 0,
                 limit_train_examples: int | None = None, limit_eval_examples: int | None = None):
        super().__init__()
        self.limit_train_examples, self.limit_eval_examples = limit_train_examples, limit_eval_examples
        self.splits = None
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.datasets: dict = {}
        self.drop_last_train = False  # e.g. mixup pairs examples, so every training batch must be even
        self._train_sampler: ResumableRandomSampler | None = None
        self._pending_epoch_seed: int | None = None

    def load_splits(self):
        """The source's splits, read once; ``limit_train_examples`` / ``limit_eval_examples`` cap them (quick
        runs), every evaluation set alike (``extra_test`` included)."""
        if self.splits is None:
            splits = self.source()
            if self.limit_train_examples:
                splits.train = splits.train.subset(range(min(self.limit_train_examples, len(splits.train))))
            if self.limit_eval_examples:
                cap = self.limit_eval_examples
                for name in ("validation", "test"):
                    part = splits.split(name)
                    setattr(splits, name, part.subset(range(min(cap, len(part)))))
                if getattr(splits, "extra_test", None):
                    splits.extra_test = {name: part.subset(range(min(cap, len(part))))
                                         for name, part in splits.extra_test.items()}
            self.splits = splits
        return self.splits

    def _collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        return torch.utils.data.default_collate(items)

    def _train_collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        """Training batches (subclasses add batch-level augmentation such as mixup here)."""
        return self._collate(items)

    def _loader(self, name: str, shuffle: bool, batch_size: int) -> DataLoader:
        self.setup()
        return DataLoader(self.datasets[name], batch_size=batch_size, shuffle=shuffle, collate_fn=self._collate,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        trainer = self._trainer_or_none()
        pending, self._pending_epoch_seed = self._pending_epoch_seed, None
        if trainer is not None and trainer.world_size > 1:
            return self._loader("train", True, self.batch_size)  # Lightning inserts its DistributedSampler
        sampler = ResumableRandomSampler(len(self.datasets["train"]), self.batch_size)
        if pending is not None and trainer is not None and trainer.ckpt_path:  # a fit resumed from a checkpoint
            done = int(trainer.fit_loop.epoch_loop.batch_progress.current.completed)
            if 0 < done < -(-len(sampler) // self.batch_size):  # mid-epoch: same order, skip what was trained
                sampler.resume(pending, done)
        self._train_sampler = sampler
        return DataLoader(self.datasets["train"], batch_size=self.batch_size, sampler=sampler,
                          collate_fn=self._train_collate, num_workers=self.num_workers, drop_last=self.drop_last_train,
                          persistent_workers=self.num_workers > 0)

    def _trainer_or_none(self):
        return getattr(self, "trainer", None)

    # -- the interrupted epoch's order travels in every checkpoint (see ResumableRandomSampler)
    def state_dict(self) -> dict:
        seed = self._train_sampler.epoch_seed if self._train_sampler is not None else None
        return {"train_epoch_seed": seed}

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending_epoch_seed = state_dict.get("train_epoch_seed")

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", False, self.eval_batch_size)

    @property
    def test_set_names(self) -> list[str]:
        """Names of the test loaders, in order (``test`` first; MNLI adds ``test_mismatched``). The
        LightningModule logs each loader's metrics under its name."""
        splits = self.load_splits()
        return list(getattr(splits, "test_sets", None) or ["test"])

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        """One loader, or one per test set when the task has several (MNLI matched and mismatched)."""
        loaders = [self._loader(name, False, self.eval_batch_size) for name in self.test_set_names]
        return loaders[0] if len(loaders) == 1 else loaders
