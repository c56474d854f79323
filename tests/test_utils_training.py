"""Shared training utilities (optimizer, learning-rate schedule, thread cap), against hand-computed values."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from opdf_exp.errors import ConfigError
from opdf_exp.utils.optim import adamw, lr_factor, with_schedule


def test_warmup_then_each_decay_by_hand():
    # warm-up over 4 steps: 1/4, 2/4, 3/4, 4/4; then 8 more steps to the end (total 12)
    assert [lr_factor(s, 4, 12, "linear") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(8, 4, 12, "linear") == pytest.approx(0.5) and lr_factor(12, 4, 12, "linear") == 0.0
    assert lr_factor(8, 4, 12, "cosine") == pytest.approx(0.5) and lr_factor(12, 4, 12, "cosine") == pytest.approx(0.0)
    assert lr_factor(6, 4, 12, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(12, 4, 12, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(11, 0, 12, "constant") == 1.0
    # tail_linear: constant until 80% (step 8 of 10), then linear to 0
    assert [lr_factor(s, 0, 10, "tail_linear") for s in (0, 7, 8, 9, 10)] == [1.0, 1.0, 1.0, 0.5, 0.0]


def test_wsd_curve_by_hand():
    """Warm-up 2 steps, stable, then linear decay over the last 20% of 20 steps to min_ratio 0.1."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = with_schedule(optimizer, 2, 20, "wsd", min_ratio=0.1, decay_ratio=0.2)["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(21):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # steps 0-1 warm up (1/2, 2/2); 2-16 stable; decay starts at 20 - 0.2 * 20 = 16: (20 - s) / 4 of the way
    expected = [0.5, 1.0] + [1.0] * 14 + [1.0, 0.775, 0.55, 0.325, 0.1]
    assert lrs == pytest.approx([2.0 * f for f in expected])
    # the decay never starts inside the warm-up; a bad decay_ratio fails before training
    assert [lr_factor(s, 4, 5, "wsd", decay_ratio=0.5) for s in (3, 4, 5)] == [1.0, 1.0, 0.0]
    with pytest.raises(ConfigError, match="decay_ratio=0.0 must be in"):
        with_schedule(optimizer, 2, 20, "wsd", decay_ratio=0.0)


def test_unknown_schedule_fails_before_training():
    with pytest.raises(ConfigError, match="schedule 'cosin' is unknown"):
        with_schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 5, 10, "cosin")


def test_adamw_skips_decay_on_biases_and_norms_and_frozen_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    decay, no_decay = adamw([model], lr=1e-3, weight_decay=0.1).param_groups
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])] and decay["weight_decay"] == 0.1
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0  # 2 biases, LayerNorm weight and bias


def test_torch_threads_caps_and_restores():
    from opdf_exp.utils.threads import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None), torch_threads(before + 4):  # no cap / a cap above the current setting: unchanged
        assert torch.get_num_threads() == before


def test_adamw_is_fused_on_cpu_and_matches_the_loop_up_to_rounding():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 2))
    twin = copy.deepcopy(model)
    fused = adamw([model], lr=1e-2, weight_decay=0.1)
    loop = adamw([twin], lr=1e-2, weight_decay=0.1, fused=False)
    assert all(g["fused"] for g in fused.param_groups) and not any(g["fused"] for g in loop.param_groups)
    x = torch.randn(8, 6)
    for _ in range(5):
        for net, opt in ((model, fused), (twin, loop)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert adamw([torch.nn.Linear(2, 2).to(torch.float64)], lr=1e-3).param_groups[0]["fused"]
