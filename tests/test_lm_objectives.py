"""LM distillation objectives against hand-computed values on a tiny vocabulary, the JSD endpoints against the two
KLs, and the chunked vocabulary loss against the whole-logits loss (value and every gradient)."""
from __future__ import annotations

import math

import pytest
import torch

from opdf_exp.distill.lm_objectives import LMObjective, chunked_lm_loss, lm_loss, token_divergence
from opdf_exp.errors import ConfigError

P_T = [0.7, 0.2, 0.1]   # teacher distribution on a 3-token vocabulary
P_S = [0.5, 0.3, 0.2]   # student distribution


def logits(p):
    return torch.log(torch.tensor([p], dtype=torch.float64))


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_divergences_equal_hand_computed_values():
    s, t = logits(P_S), logits(P_T)
    assert token_divergence("forward_kl", s, t).item() == pytest.approx(kl(P_T, P_S), rel=1e-12)
    assert token_divergence("reverse_kl", s, t).item() == pytest.approx(kl(P_S, P_T), rel=1e-12)
    assert token_divergence("tvd", s, t).item() == pytest.approx(0.5 * sum(abs(a - b) for a, b in zip(P_T, P_S)))
    beta = 0.3
    m = [beta * a + (1 - beta) * b for a, b in zip(P_T, P_S)]
    expected = beta * kl(P_T, m) + (1 - beta) * kl(P_S, m)
    assert token_divergence("jsd", s, t, beta=beta).item() == pytest.approx(expected, rel=1e-12)
    # the endpoints are the two KLs, as TRL defines them
    assert token_divergence("jsd", s, t, beta=0.0).item() == pytest.approx(kl(P_T, P_S), rel=1e-12)
    assert token_divergence("jsd", s, t, beta=1.0).item() == pytest.approx(kl(P_S, P_T), rel=1e-12)
    # temperature: divergence of the softened distributions, times T^2 for the KL family
    soft = lambda p, temp: [x ** (1 / temp) / sum(y ** (1 / temp) for y in p) for x in p]  # noqa: E731
    assert token_divergence("forward_kl", s, t, temperature=2.0).item() == pytest.approx(
        4 * kl(soft(P_T, 2.0), soft(P_S, 2.0)), rel=1e-12)


def test_objective_means_over_real_tokens_only():
    objective = LMObjective({"ce": 1.0, "reverse_kl": 0.5})
    s = torch.cat([logits(P_S), logits(P_T)])
    t = torch.cat([logits(P_T), logits(P_T)])
    labels = torch.tensor([0, 2])
    total, means = lm_loss(s, t, labels, torch.tensor([1.0, 0.0], dtype=torch.float64), objective)
    assert means["ce"].item() == pytest.approx(-math.log(P_S[0]))  # the padded second token does not count
    assert means["reverse_kl"].item() == pytest.approx(kl(P_S, P_T))
    assert total.item() == pytest.approx(-math.log(P_S[0]) + 0.5 * kl(P_S, P_T))


@pytest.mark.parametrize("terms", [{"ce": 1.0, "forward_kl": 1.0}, {"reverse_kl": 1.0}, {"jsd": 1.0, "ce": 0.5},
                                   {"tvd": 1.0}])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_loss_equals_the_whole_logits_loss_with_gradients(terms, chunk):
    torch.manual_seed(0)
    n, d, v = 23, 8, 50
    hidden = torch.randn(n, d, requires_grad=True)
    weight, bias = torch.randn(v, d, requires_grad=True), torch.randn(v, requires_grad=True)
    t_hidden, t_weight = torch.randn(n, d), torch.randn(v, d)
    labels, weights = torch.randint(0, v, (n,)), (torch.rand(n) > 0.2).float()
    objective = LMObjective(terms, temperature=1.5, beta=0.3)
    whole, whole_means = lm_loss(hidden @ weight.t() + bias, t_hidden @ t_weight.t(), labels, weights, objective)
    g_whole = torch.autograd.grad(whole, [hidden, weight, bias])
    chunked_objective = LMObjective(terms, temperature=1.5, beta=0.3, chunk_size=chunk)
    total, means = chunked_lm_loss(hidden, weight, bias, labels, weights, chunked_objective,
                                   lambda a, b: t_hidden[a:b] @ t_weight.t())
    g_chunked = torch.autograd.grad(2.0 * total, [hidden, weight, bias])  # an upstream scale reaches every grad
    assert total.item() == pytest.approx(whole.item(), rel=1e-5, abs=1e-6)
    for name in whole_means:
        assert means[name].item() == pytest.approx(whole_means[name].item(), rel=1e-5, abs=1e-6)
    for a, b in zip(g_chunked, g_whole):
        assert torch.allclose(a, 2.0 * b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"beta": 1.5}, "beta=1.5 must be in [0, 1]"),
    ({"beta": -0.1}, "beta=-0.1 must be in [0, 1]"),
    ({"chunk_size": 0}, "chunk_size=0 must be a positive number of tokens"),
    ({"terms": {"kl": 1.0}}, "terms ['kl'] are unknown"),
    ({"temperature": 0}, "temperature=0 must be > 0"),
])
def test_bad_objectives_fail_in_one_line(kwargs, message):
    with pytest.raises(ConfigError) as error:
        LMObjective(**kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_stage3_chunked_objective_equals_whole_logits_on_a_converted_tiny_llama(divergence):
    """The stage-3 module on a tiny random GQA Llama and its converted GLA student: the loss through the LM heads
    in chunks equals the loss on whole logits, and so do the student's gradients."""
    from opdf_exp.lit.subquadratic import EndToEndKDModule
    from opdf_exp.models.causal_lm import tiny_llama
    from opdf_exp.subquadratic.convert import convert

    torch.manual_seed(0)
    teacher, _ = tiny_llama(num_hidden_layers=2)
    student = convert(teacher, "gla")
    ids = torch.randint(0, teacher.config.vocab_size, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    results = {}
    for chunk in (None, 7):
        module = EndToEndKDModule(student, teacher, divergence=divergence, beta=0.3, chunk_size=chunk)
        student.zero_grad()
        total, values = module._objective_losses(ids, mask)
        total.backward()
        results[chunk] = (total.detach(), {k: v.detach() for k, v in values.items()},
                          {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
    (whole, w_values, w_grads), (chunked, c_values, c_grads) = results[None], results[7]
    assert set(w_values) == {"ce", divergence} and torch.allclose(chunked, whole, rtol=1e-5, atol=1e-6)
    assert c_values.keys() == w_values.keys()
    for term in w_values:  # every logged term, not only the total, is the unchunked one
        assert torch.allclose(c_values[term], w_values[term], rtol=1e-5, atol=1e-6), term
    assert w_grads.keys() == c_grads.keys() and w_grads
    for name in w_grads:
        assert torch.allclose(c_grads[name], w_grads[name], rtol=1e-4, atol=1e-6), name


def test_stage3_objective_bad_input_in_one_line():
    from opdf_exp.lit.subquadratic import EndToEndKDModule
    from opdf_exp.models.causal_lm import tiny_llama
    from opdf_exp.subquadratic.convert import convert

    teacher, _ = tiny_llama(num_hidden_layers=1)
    student = convert(teacher, "gla")
    with pytest.raises(ConfigError, match="divergence='kl' is unknown"):
        EndToEndKDModule(student, teacher, divergence="kl")
    with pytest.raises(ConfigError, match=r"student's vocabulary \(257 tokens\) differs from the teacher's \(300\)"):
        EndToEndKDModule(student, tiny_llama(vocab_size=300, num_hidden_layers=1)[0])
    with pytest.raises(ConfigError, match="batchmean"):
        EndToEndKDModule(student, teacher, kl_reduction="batchmean", chunk_size=8)


def test_on_policy_batches_are_the_students_continuations_scored_by_the_teacher(tmp_path):
    """on_policy=1: every step samples continuations of each block's first half from the student (batched, the
    block's full length), and trains on the divergence over the generated half only; the draws depend on the
    step alone. A real Lightning fit logs the on-policy share and the generation time."""
    import pytorch_lightning as pl

    from opdf_exp.lit.subquadratic import EndToEndKDModule
    from opdf_exp.models.causal_lm import tiny_llama
    from opdf_exp.subquadratic.convert import convert

    torch.manual_seed(0)
    teacher, _ = tiny_llama(num_hidden_layers=2)
    student = convert(teacher, "gla")
    module = EndToEndKDModule(student, teacher, divergence="reverse_kl", on_policy=1.0, on_policy_prompt=0.5,
                              chunk_size=16)
    ids = torch.randint(0, 200, (3, 20))
    sequences, prompt = module.generate_continuations(ids, None)
    assert prompt == 10 and sequences.shape == ids.shape and torch.equal(sequences[:, :10], ids[:, :10])
    assert not torch.equal(sequences[:, 10:], ids[:, 10:])  # the second half is the student's own
    total, extra = module._on_policy_losses({"input_ids": ids})
    assert set(extra) == {"reverse_kl", "generation_s"} and torch.isfinite(total)  # no CE on its own samples
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    half = EndToEndKDModule(student, teacher, on_policy=0.5)
    draws = [half.on_policy_step(step) for step in range(200)]
    assert draws == [half.on_policy_step(step) for step in range(200)] and 70 < sum(draws) < 130
    assert not any(EndToEndKDModule(student, teacher).on_policy_step(step) for step in range(20))

    loader = torch.utils.data.DataLoader([{"input_ids": row} for row in torch.randint(0, 200, (8, 16))],
                                         batch_size=4)
    csv = pl.loggers.CSVLogger(tmp_path)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=csv, log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(EndToEndKDModule(student, teacher, on_policy=1.0, log_prefix="end_to_end/"), loader)
    text = next(tmp_path.rglob("metrics.csv")).read_text()
    assert "end_to_end/train/on_policy" in text and "end_to_end/train/generation_s" in text


def test_on_policy_bad_input_in_one_line():
    from opdf_exp.lit.subquadratic import EndToEndKDModule
    from opdf_exp.models.causal_lm import tiny_llama
    from opdf_exp.subquadratic.convert import convert

    teacher, _ = tiny_llama(num_hidden_layers=1)
    student = convert(teacher, "gla")
    with pytest.raises(ConfigError, match=r"on_policy=1.5 is the share .* in \[0, 1\]"):
        EndToEndKDModule(student, teacher, on_policy=1.5)
    with pytest.raises(ConfigError, match="needs kl_weight > 0"):
        EndToEndKDModule(student, teacher, on_policy=0.5, kl_weight=0.0)

    class NoGenerate(torch.nn.Module):  # e.g. a bare base model: it has an LM head but cannot generate
        def __init__(self, model):
            super().__init__()
            self.inner = model

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

    with pytest.raises(ConfigError, match="NoGenerate has no generate"):
        EndToEndKDModule(NoGenerate(student), teacher, on_policy=0.5)


def test_sequence_level_kd_blocks_are_the_teachers_continuations_and_cached(tmp_path, monkeypatch):
    from opdf_exp.models.causal_lm import tiny_llama
    from opdf_exp.subquadratic.sequence_kd import SequenceKDSettings, cache_key, sequence_kd_blocks

    teacher, _ = tiny_llama(num_hidden_layers=1)
    blocks = torch.randint(0, 200, (5, 12))
    greedy = SequenceKDSettings(prompt_tokens=4, decoding="greedy", batch_size=2)
    result = sequence_kd_blocks(teacher, blocks, greedy, tmp_path)
    assert result.shape == blocks.shape and torch.equal(result[:, :4], blocks[:, :4])
    expected = teacher.generate(input_ids=blocks[:1, :4], attention_mask=torch.ones_like(blocks[:1, :4]),
                                max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(result[:1], expected)
    files = list((tmp_path / "sequence_kd").glob("*.safetensors"))
    assert len(files) == 1 and not list((tmp_path / "sequence_kd").glob("*.tmp"))
    monkeypatch.setattr(type(teacher), "generate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("regenerated")))
    assert torch.equal(sequence_kd_blocks(teacher, blocks, greedy, tmp_path), result)  # read back, not regenerated
    sampled = SequenceKDSettings(prompt_tokens=4, decoding="sample", temperature=0.7)
    keys = {cache_key(teacher, blocks, s) for s in (greedy, sampled, SequenceKDSettings(prompt_tokens=5))}
    assert len(keys) == 3 and cache_key(teacher, blocks[:4], greedy) not in keys  # settings and data in the key
    with pytest.raises(ConfigError, match="prompt_tokens=12 must be between 1 and the block size minus one"):
        sequence_kd_blocks(teacher, blocks, SequenceKDSettings(prompt_tokens=12), tmp_path)
    with pytest.raises(ConfigError, match="decoding='beam' is unknown"):
        sequence_kd_blocks(teacher, blocks, SequenceKDSettings(decoding="beam"), tmp_path)


def test_on_policy_generation_trains_lora_adapters_and_merges():
    """The recipe's stage 3 (train=lora) with on_policy: the student generates through the injected peft layers
    (adapters active), the on-policy loss reaches the adapters and not the frozen base weights, and after merging
    the plain student produces the same logits as the adapted one."""
    from opdf_exp.lit.subquadratic import EndToEndKDModule
    from opdf_exp.models.causal_lm import tiny_llama
    from opdf_exp.subquadratic.adapters import merge_adapters, set_train_mode
    from opdf_exp.subquadratic.convert import convert

    torch.manual_seed(0)
    teacher, _ = tiny_llama(num_hidden_layers=2)
    student = convert(teacher, "gla")
    counts = set_train_mode(student, "lora", {"r": 4})
    assert 0 < counts["adapter"] < counts["trainable"] < counts["total"]
    for name, p in student.named_parameters():
        if "lora_B" in name:  # B starts at 0, so the adapters would be invisible to generate; make them act
            torch.nn.init.normal_(p, std=0.05)
    module = EndToEndKDModule(student, teacher, on_policy=1.0, on_policy_prompt=0.5)
    ids = torch.randint(0, 200, (2, 12))
    sequences, prompt = module.generate_continuations(ids, None)
    assert sequences.shape == ids.shape and torch.equal(sequences[:, :prompt], ids[:, :prompt])
    total, _ = module._on_policy_losses({"input_ids": ids})
    total.backward()
    grads = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    assert any("lora_A" in n and g.abs().sum() > 0 for n, g in grads.items())
    assert not any(n.endswith("base_layer.weight") for n in grads)  # the copied projections stay frozen
    student.eval()
    with torch.no_grad():
        adapted = student(ids).logits
        assert merge_adapters(student) > 0
        merged = student(ids).logits
    assert not any("lora_" in n for n, _ in student.named_parameters())
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
