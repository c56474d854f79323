"""Packaging: the torchvision work-around, one Lightning namespace, and configs shipped in a non-editable install."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_torchvision_timm_lightning_import_and_work():
    import timm
    import torch
    import torchvision  # noqa: F401

    from opdf_exp import _torchvision_compat

    assert _torchvision_compat.PATCH_STATE in {"patched", "native"}
    if not torch.cuda.is_available():
        assert _torchvision_compat.PATCH_STATE == "patched"  # the CUDA-only wheel on a CPU torch
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_torchvision_work_around_in_a_fresh_interpreter():
    code = ("import opdf_exp, torchvision, timm, pytorch_lightning, transformers; "
            "from transformers import BertForSequenceClassification; "
            "print(opdf_exp._torchvision_compat.PATCH_STATE)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() in {"patched", "native"}


def test_code_uses_one_lightning_namespace():
    offenders = []
    for path in list((REPO / "opdf_exp").rglob("*.py")) + list((REPO / "conf").rglob("*.yaml")):
        text = path.read_text()
        if "import lightning" in text or "from lightning" in text or "_target_: lightning." in text:
            offenders.append(str(path.relative_to(REPO)))
    assert not offenders, f"use pytorch_lightning only: {offenders}"


def test_configs_ship_in_a_non_editable_install(tmp_path):
    """Build a wheel, install it into a bare folder and compose a config from an unrelated working directory."""
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheel_dir), str(REPO)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(wheel_dir.glob("opdf_exp-*.whl"))
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    assert (target / "opdf_exp" / "conf" / "experiment" / "bert_glue.yaml").is_file()
    code = ("import opdf_exp, sys; assert opdf_exp.__file__.startswith(sys.argv[1]), opdf_exp.__file__; "
            "from hydra import compose, initialize_config_module; "
            "from opdf_exp.runner import resolvers; resolvers.register(); "
            "initialize_config_module('opdf_exp.conf', version_base='1.3'); "
            "cfg = compose('config', overrides=['+experiment=bert_glue', 'data=glue/sst2']); "
            "print(cfg.teacher.model.name_or_path, cfg.data.name)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); "
                          f"sys.argv = ['x', {str(target)!r}]; exec({code!r})"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["bert-base-uncased", "sst2"]


def test_layers_only_depend_downward():
    """The MPO math, mixers, subquadratic students, geometry (maths and models only), models and losses import
    without Lightning or Hydra;
    only runner/ reads configs."""
    code = ("import sys, opdf_exp.mpo, opdf_exp.mixers, opdf_exp.geometry.theory, opdf_exp.geometry.toy, "
            "opdf_exp.geometry.sae, opdf_exp.geometry.distill_lm, opdf_exp.geometry.probe, opdf_exp.models, "
            "opdf_exp.distill, opdf_exp.subquadratic, opdf_exp.subquadratic.evaluate, "
            "opdf_exp.subquadratic.teacher_forcing, opdf_exp.models.causal_lm, opdf_exp.models.timm_models, "
            "opdf_exp.models.io, opdf_exp.distill.adapters, opdf_exp.distill.methods, opdf_exp.distill.lgtm, "
            "opdf_exp.distill.teacher_cache; "
            "print(sorted(m for m in ('pytorch_lightning', 'hydra', 'omegaconf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
    config_readers = [str(p.relative_to(REPO)) for p in (REPO / "opdf_exp").rglob("*.py")
                      if p.parent.name != "runner" and any(f"{kw} {mod}" in p.read_text() for kw in ("import", "from")
                                                           for mod in ("hydra", "omegaconf"))]
    assert not config_readers, f"only opdf_exp/runner may use Hydra/OmegaConf: {config_readers}"
