"""Sparse teacher targets for stage 3 (issue 16, item 5): the sampled cache's loss is an unbiased estimate of the
cross-entropy whose gradient is forward KL's, top-k is not, and a file is reused only for the same teacher,
vocabulary and blocks."""
import logging

import pytest
import torch
import torch.nn.functional as F

from opdf_exp.distill.sparse_targets import build_sparse_targets, load_or_build_targets, sparse_forward_kl
from opdf_exp.errors import ConfigError
from opdf_exp.models.causal_lm import tiny_llama


def test_sampled_targets_estimate_forward_kl_and_its_gradient_without_bias():
    """With many sampled tokens per position, the estimate's value and student gradient approach the exact
    forward KL's (the sample mean of -log q(x), x ~ p, minus H(p)); top-k with few tokens stays biased."""
    torch.manual_seed(0)
    v, m = 50, 6
    teacher_logits = 2 * torch.randn(m, v)
    student_logits = torch.randn(m, v, requires_grad=True)
    p = F.softmax(teacher_logits, -1)
    entropy = -(p * p.log()).sum(-1)
    weights = torch.ones(m)
    exact = (p * (p.log() - F.log_softmax(student_logits, -1))).sum(-1).mean()
    exact_grad, = torch.autograd.grad(exact, student_logits)
    ids = torch.multinomial(p, 20000, replacement=True, generator=torch.Generator().manual_seed(1))
    loss, kl = sparse_forward_kl(student_logits, ids, weights, entropy)
    grad, = torch.autograd.grad(loss, student_logits)
    assert abs(kl.item() - exact.item()) < 0.02 * exact.item() + 0.01
    assert (grad - exact_grad).abs().max() < 0.01
    top_p, top_ids = p.topk(3, -1)
    _, top_kl = sparse_forward_kl(student_logits, top_ids, weights, entropy, top_p)
    top_grad, = torch.autograd.grad(sparse_forward_kl(student_logits, top_ids, weights, entropy, top_p)[0],
                                    student_logits)
    assert (top_grad - exact_grad).abs().max() > 5 * (grad - exact_grad).abs().max()  # the truncation's bias


def test_targets_from_a_teacher_and_their_file_key(tmp_path, caplog):
    teacher = tiny_llama(num_hidden_layers=1)[0]
    blocks = torch.randint(1, 256, (3, 10))
    sampled = build_sparse_targets(teacher, blocks, "sampled", k=8, seed=3)
    assert sampled.ids.shape == (3, 9, 8) and sampled.ids.dtype == torch.int32 and sampled.probs is None
    with torch.no_grad():
        p = F.softmax(teacher(blocks).logits[:, :-1], -1)
    torch.testing.assert_close(sampled.entropy, -(p * p.log()).sum(-1), rtol=1e-4, atol=1e-5)
    top = build_sparse_targets(teacher, blocks, "topk", k=4)
    torch.testing.assert_close(top.probs.float(), p.topk(4, -1).values, rtol=1e-3, atol=1e-3)
    path = tmp_path / "targets.safetensors"
    first = load_or_build_targets(teacher, blocks, path, "sampled", k=8, seed=3)
    assert torch.equal(first.ids, sampled.ids)  # the seed fixes the sample
    with caplog.at_level(logging.INFO, logger="opdf_exp.utils.keyed_file"):
        load_or_build_targets(teacher, blocks, path, "sampled", k=8, seed=3)
        assert "loaded from" in caplog.text
        caplog.clear()
        load_or_build_targets(tiny_llama(num_hidden_layers=1, vocab_size=300)[0], blocks, path, "sampled", k=8,
                              seed=3)
        assert "rebuilt: its teacher, vocab_size differ" in caplog.text
        caplog.clear()
        load_or_build_targets(teacher, blocks[:, :6].contiguous(), path, "sampled", k=8, seed=3)
        assert "blocks, block_size differ" in caplog.text
    from opdf_exp.lit.subquadratic import EndToEndKDModule
    from opdf_exp.subquadratic import convert

    module = EndToEndKDModule(convert(teacher, "gla"), teacher, teacher_targets=sampled)
    assert "teacher_targets" not in module.hparams  # never serialised into hparams.yaml or checkpoints
    with pytest.raises(ConfigError, match="teacher_cache.kind='full' is unknown"):
        build_sparse_targets(teacher, blocks, "full")
    with pytest.raises(ConfigError, match="teacher_cache.k=0 must be a positive number"):
        build_sparse_targets(teacher, blocks, "sampled", k=0)
