"""LM side of the width sweep: GPT-NeoX students, corpus split, probes, fail-fast hub."""
import time

import numpy as np
import pytest
import torch

from opdf_exp.errors import OfflineError
from opdf_exp.geometry import distill_lm as lm
from opdf_exp.geometry import probe


def test_heads_rule_and_student_build():
    assert [lm.heads_for_width(w) for w in (8, 16, 32, 48, 64, 128, 256, 1024)] == [1, 1, 2, 2, 4, 8, 16, 16]
    cfg = lm.neox_config(257, 24, 2, eos_token_id=256)
    model = lm.build_neox(cfg, seed=0)
    ids = torch.randint(0, 257, (2, 16))
    assert model(input_ids=ids).logits.shape == (2, 16, 257)
    again = lm.build_neox(cfg, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_bbc_split_is_disjoint_and_stable():
    docs = lm.load_bbc()
    assert len(docs) == 2121 and docs[0].name == "business/001.txt" and docs[-1].label == 4  # duplicates removed
    assert len({" ".join(d.text.split()) for d in docs}) == len(docs)
    train, held = lm.split_documents(docs, 0.15, seed=0)
    assert not {d.name for d in train} & {d.name for d in held}
    assert len(train) + len(held) == len(docs)
    assert [d.name for d in lm.split_documents(docs, 0.15, seed=0)[1]] == [d.name for d in held]
    tok = lm.ByteTokenizer()
    windows = lm.pack_windows(lm.encode_stream(held[:5], tok), 64)
    assert windows.shape[1] == 64 and int(windows.max()) <= 256
    assert tok.decode(tok.encode("héllo")) == "héllo"


def test_probe_accuracy_on_separable_and_random_labels():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 8))
    y = x[:, 0] > 0.3
    groups = np.arange(600) // 3
    assert probe.probe_accuracy(x, y, groups, seed=0) > 0.9
    assert 0.3 < probe.probe_accuracy(x, rng.random(600) > 0.5, groups, seed=0) < 0.7
    assert np.isnan(probe.probe_accuracy(x, np.zeros(600, bool), groups))


def test_pythia_recipe_fails_fast_offline(tmp_path, monkeypatch):
    from tests.helpers.hydra import compose_job

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from opdf_exp import hub

    hub.hub_reachable.cache_clear()
    with compose_job(["+experiment=geometric_floor_pythia"], tmp_path) as cfg:
        assert list(cfg.task.students.widths) == [128, 256, 512, 768, 1024]
        assert cfg.task.teacher.pretrained == "EleutherAI/pythia-410m" and cfg.task.hook.layer == 12
        import hydra

        task = hydra.utils.instantiate(cfg.task, _partial_=True)
        started = time.perf_counter()
        with pytest.raises(OfflineError, match="task.teacher.pretrained") as err:
            task(cfg)
        assert time.perf_counter() - started < 10
        assert "\n" not in str(err.value)


def test_floor_smoke_end_to_end(tmp_path):
    """+experiment=geometric_floor_smoke: teacher, SAE, 3 students, fit and probes, through the shipped configs."""
    import json

    import hydra

    from tests.helpers.hydra import compose_job

    with compose_job(["+experiment=geometric_floor_smoke"], tmp_path) as cfg:
        result = hydra.utils.instantiate(cfg.task, _partial_=True)(cfg)
    m = result["metrics"]
    assert m["F_alive"] > 1 and 0 < m["alpha"] < 1 and m["d_star"] > 0
    assert {"floor_w4", "floor_w8", "floor_w16", "C", "B", "r2", "B_at_dT_r2"} <= set(m)
    assert m["pred_w4"] >= m["pred_w8"] >= m["pred_w16"] >= 0
    assert all(m[f"floor_w{w}"] > 0 for w in (4, 8, 16))
    for name in ("floor_vs_width.csv", "floor_fit.md", "sae_measurement.json", "probes.csv", "floor_vs_width.png",
                 "probe_accuracy.png", "histories.json"):
        assert (tmp_path / name).exists(), name
    sae = json.loads((tmp_path / "sae_measurement.json").read_text())
    assert len(sae["importances"]) == sae["F_alive"]
    # the CLI reproduces the run's predictions from its own measurement file
    from opdf_exp.geometry.__main__ import main

    assert main(["predict", "-F", str(sae["F_alive"]), "--alpha", str(sae["alpha"]), "--widths", "4,8,16",
                 "--importances", str(tmp_path / "sae_measurement.json")]) == 0


@pytest.mark.parametrize("params, message", [
    ({"probe": {"docs": "train"}}, "task.probe.docs=train is unknown"),
    ({"fit": {"primary": "median"}}, "task.fit.primary=median is unknown"),
    ({"students": {"widths": [8]}}, "needs at least two widths"),
    ({"tokenizer": "teacher"}, "task.tokenizer=teacher needs task.teacher.pretrained"),
])
def test_floor_bad_input_fails_before_any_training(tmp_path, params, message):
    """Checked from the parameters alone: no corpus read, no teacher built (make_trainer is never called)."""
    from opdf_exp.errors import ConfigError
    from opdf_exp.runner.geometry_runs import run_floor_experiment

    def no_trainer(*args, **kwargs):
        raise AssertionError("training started before the bad input was caught")

    with pytest.raises(ConfigError, match=message) as err:
        run_floor_experiment(params, tmp_path, make_trainer=no_trainer)
    assert "\n" not in str(err.value)
