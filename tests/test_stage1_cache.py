"""Stage 1 on cached teacher activations and the calibrated start (issue 16, items 1 and 4), on a tiny random GQA
Llama: the cache reproduces the teacher walk, the disk cache is reused only when its key matches, and every
mixer starts below a zero output's error once its output scales are fitted."""
import logging

import pytest
import torch

from opdf_exp.errors import ConfigError
from opdf_exp.lit.subquadratic import AttentionTransferModule
from opdf_exp.mixers import list_mixers
from opdf_exp.models.causal_lm import tiny_llama
from opdf_exp.subquadratic import convert
from opdf_exp.subquadratic.attention_cache import collect_attention_io, load_or_collect
from opdf_exp.subquadratic.calibrate import calibrate_output_scales
from opdf_exp.subquadratic.teacher_forcing import layer_fidelity


@pytest.fixture(scope="module")
def teacher():
    return tiny_llama(num_hidden_layers=3)[0]


@pytest.mark.parametrize("target", ["output", "matrix"])
def test_cached_stage1_losses_equal_the_teacher_walk(teacher, target):
    """The same blocks give the same per-layer losses and gradients whether the teacher is walked or cached."""
    torch.manual_seed(0)
    student = convert(teacher, "gla", rope=True, attention_layers=[1])
    blocks = torch.randint(1, 256, (3, 16))
    io = collect_attention_io(teacher, blocks, list(student.mixers()))
    assert io.layers == [0, 2] and io.inputs[0].shape == (3, 16, 64)
    walked = AttentionTransferModule(student, teacher, target=target)
    cached = AttentionTransferModule(student, teacher, target=target, activations=io)
    assert "activations" not in cached.hparams  # never serialised into hparams.yaml or checkpoints
    batch = {"input_ids": blocks, "attention_mask": torch.ones_like(blocks)}
    ref = walked.layer_losses(batch, backward=True)
    ref_grads = [None if p.grad is None else p.grad.clone() for p in walked.trainable_parameters()]
    student.zero_grad(set_to_none=True)
    got = cached.cached_losses(torch.arange(3), io, backward=True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    for g, r in zip((p.grad for p in cached.trainable_parameters()), ref_grads):
        assert (g is None) == (r is None)  # target=matrix leaves o_proj and the gates without a gradient
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)


def test_disk_cache_is_reused_only_for_the_same_teacher_and_tokens(teacher, tmp_path, caplog):
    blocks = torch.randint(1, 256, (2, 8))
    path = tmp_path / "stage1.safetensors"
    first = load_or_collect(teacher, blocks, [0, 2], path)
    assert path.exists() and not list(tmp_path.glob(".*partial"))  # written under a temporary name, then renamed
    with caplog.at_level(logging.INFO, logger="opdf_exp.utils.keyed_file"):
        again = load_or_collect(teacher, blocks, [0, 2], path)
    assert "loaded from" in caplog.text
    torch.testing.assert_close(again.outputs[2], first.outputs[2], rtol=0, atol=0)
    other = tiny_llama(num_hidden_layers=3, seed=1)[0]  # another checkpoint of the same architecture
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="opdf_exp.utils.keyed_file"):
        rebuilt = load_or_collect(other, blocks, [0, 2], path)
    assert "rebuilt: its teacher differ" in caplog.text
    assert not torch.allclose(rebuilt.outputs[2], first.outputs[2])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="opdf_exp.utils.keyed_file"):
        load_or_collect(other, blocks[:, :4].contiguous(), [0, 2], path)
    assert "rebuilt: its blocks, shape differ" in caplog.text


@pytest.mark.parametrize("name", list_mixers())
def test_every_mixer_starts_below_a_zero_output_after_calibration(teacher, name):
    """Right after QKV copying the output norms hand o_proj unit-scale outputs (error >> 1); the fitted channel
    scales bring every layer below a zero output's error (1) on the calibration blocks, which least squares
    guarantees, and keep it near or below 1 on other random blocks."""
    torch.manual_seed(0)
    calibration, held_out = torch.randint(1, 256, (32, 64)), torch.randint(1, 256, (8, 64))
    student = convert(teacher, name)
    copied = {i: f["output_rel_err"] for i, f in layer_fidelity(student, teacher, held_out, with_matrix=False).items()}
    fitted = calibrate_output_scales(student, teacher, calibration)
    after = {i: f["output_rel_err"] for i, f in layer_fidelity(student, teacher, held_out, with_matrix=False).items()}
    assert all(0 < e < 1 for e in fitted.values()), fitted
    assert all(after[i] < copied[i] for i in copied), (copied, after)
    assert all(e < 1.1 for e in after.values()), after
    if name in ("linear_attention", "deltanet", "gated_deltanet", "mamba2"):
        assert all(e < 1 for e in after.values()), after


def test_stage1_cache_bad_input_is_one_line(teacher, tmp_path):
    from omegaconf import OmegaConf

    from opdf_exp.runner.subquadratic_task import stage1_activations

    student = convert(teacher, "gla")
    cfg = OmegaConf.create({"paths": {"cache_dir": str(tmp_path), "output_dir": str(tmp_path)}})
    blocks = torch.randint(1, 256, (4, 8))
    with pytest.raises(ConfigError, match="cache='ram' is unknown; use one of"):
        stage1_activations(cfg, student, teacher, blocks, blocks, "ram", 2)
    with pytest.raises(ConfigError, match=r"would take .* GB .*cache_max_gb=1e-06; lower the first share"):
        stage1_activations(cfg, student, teacher, blocks, blocks, "memory", 2, max_gb=1e-6)
    acts, _ = stage1_activations(cfg, student, teacher, blocks, blocks, "disk", 2)
    assert len(list((tmp_path / "stage1").glob("*.safetensors"))) == 1 and acts.num_blocks == 4
    with pytest.raises(ConfigError, match=r"hold layers \[0\], the student's mixers are \[0, 1, 2\]"):
        AttentionTransferModule(student, teacher, activations=collect_attention_io(teacher, blocks, [0]))
