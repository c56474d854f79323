"""Image sources and the image DataModule: ImageNet-layout folders (and their bad inputs), the packaged MNIST
digits, timm transforms from a model's data config, and the shared resumable loaders."""
from __future__ import annotations

import pytest
import torch

from opdf_exp.data import ImageClassificationDataModule, image_folder, mnist_digits
from opdf_exp.data.images import check_image_size, check_timm_model
from opdf_exp.errors import ConfigError, MissingFileError


def _folder(root, classes=("cat", "dog", "owl"), per_class=4, splits=("train", "val")):
    from PIL import Image

    for split in splits:
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (20 + i, 18), color=(40 * c, 10 * i, 200)).save(root / split / name / f"{i}.png")
    return root


def test_image_folder_layout_classes_and_fixed_halves(tmp_path):
    splits = image_folder(str(_folder(tmp_path)))
    assert splits.class_names == ["cat", "dog", "owl"] and len(splits.train) == 12
    assert len(splits.validation) + len(splits.test) == 12
    assert sorted(splits.validation.labels) == sorted(splits.test.labels)  # stratified halves, 2 per class each
    image = splits.train.load(0)
    assert image.mode == "RGB"


def test_image_folder_bad_inputs(tmp_path):
    with pytest.raises(MissingFileError, match="ImageNet layout"):
        image_folder(str(tmp_path / "nothing"))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no class folders"):
        image_folder(str(tmp_path / "empty"))
    root = _folder(tmp_path / "mixed", splits=("train",))
    _folder(root, classes=("cat", "dog", "emu"), splits=("val",))
    with pytest.raises(ConfigError, match=r"missing \['owl'\], extra \['emu'\]"):
        image_folder(str(root))


def test_mnist_digits_ship_offline():
    splits = mnist_digits()
    assert len(splits.train) + len(splits.validation) + len(splits.test) == 5000
    assert splits.class_names == [str(d) for d in range(10)] and splits.validation.labels.count(3) == 75
    assert splits.train.load(0).size == (28, 28)


def test_datamodule_transforms_from_the_model_and_resumable_batches(tmp_path):
    import timm
    from timm.data import resolve_data_config

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32)
    config = resolve_data_config({}, model=model)
    dm = ImageClassificationDataModule(lambda: image_folder(str(_folder(tmp_path))), input_size=(3, 32, 32),
                                       mean=config["mean"], std=config["std"], batch_size=4)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["labels"].dtype == torch.long
    assert batch["example_index"].shape == (4,)
    assert model(batch["pixel_values"]).shape == (4, 3)
    assert dm.test_set_names == ["test"] and len(dm.val_dataloader().dataset) == 6


def test_timm_name_and_patch_size_checks():
    with pytest.raises(ConfigError, match="close names: .*vit_tiny_patch16_224"):
        check_timm_model("vit_tiny_patch16_22")
    check_timm_model("vit_tiny_patch16_224")
    with pytest.raises(ConfigError, match="img_size=32"):
        check_image_size("vit_tiny_patch16_224", 30, 16)
