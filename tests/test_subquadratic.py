"""The subquadratic students on a tiny random GQA Llama (hidden 64, 4 heads, 2 KV heads, head_dim 24 != 64 / 4):
convert, save/load round trip, greedy generation against a full forward, constant-size state, hybrids, QKV copy
and the one-line errors. Parametrized over ``list_mixers()`` so a new mixer is tested the moment it registers."""
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from opdf_exp.errors import ConfigError
from opdf_exp.mixers import list_mixers
from opdf_exp.subquadratic import (MixerAttention, MixerCache, MixerStateLayer, SubquadraticLlamaForCausalLM,
                                   convert, known_archs)

VOCAB = 101


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=256,
                      tie_word_embeddings=True, initializer_range=0.1,  # larger init: no near-ties in greedy argmax
                      bos_token_id=None, eos_token_id=None)  # no EOS: every row generates every step
    return LlamaForCausalLM(cfg).eval()


def _prompt(batch=2, steps=9, seed=1):
    return torch.randint(1, VOCAB, (batch, steps), generator=torch.Generator().manual_seed(seed))  # 0 is the pad id


@pytest.mark.parametrize("arch", known_archs())
def test_convert_roundtrip_and_greedy_generation(teacher, arch, tmp_path):
    student = convert(teacher, arch).eval()
    assert isinstance(student, SubquadraticLlamaForCausalLM)
    ids = _prompt()
    with torch.no_grad():
        logits = student(ids).logits
        student.save_pretrained(tmp_path)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert type(reloaded) is SubquadraticLlamaForCausalLM
        torch.testing.assert_close(reloaded(ids).logits, logits, rtol=0, atol=1e-6)
        out = student.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True,
                               return_dict_in_generate=True)
        full = student(out.sequences).logits[:, ids.shape[1] - 1:-1]  # (B, new, V): logits that chose each token
    assert torch.equal(full.argmax(-1), out.sequences[:, ids.shape[1]:])
    torch.testing.assert_close(torch.stack(out.scores, 1), full, rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch", list_mixers())
def test_state_does_not_grow_and_hybrid_keeps_kv(teacher, arch):
    ids = _prompt(batch=1, steps=5)
    student = convert(teacher, arch).eval()
    sizes = []
    for new in (3, 11):
        cache = MixerCache(student.config)
        with torch.no_grad():
            student.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                             past_key_values=cache)
        assert all(isinstance(layer, MixerStateLayer) for layer in cache.layers)
        assert cache.get_seq_length() == ids.shape[1] + new - 1
        sizes.append(cache.state_bytes())
    assert sizes[0] == sizes[1] > 0
    assert sizes[0] == student.state_bytes_per_sequence(4096)

    hybrid = convert(teacher, arch, attention_layers=[0]).eval()
    assert not isinstance(hybrid.model.layers[0].self_attn, MixerAttention)
    cache = MixerCache(hybrid.config)
    with torch.no_grad():
        hybrid.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                        past_key_values=cache)
    assert cache.layers[0].keys.shape[-2] == ids.shape[1] + 3  # the attention layer keeps a growing KV cache
    assert all(isinstance(layer, MixerStateLayer) for layer in cache.layers[1:])


def test_qkv_copy_reproduces_teacher_logits(teacher):
    """Identity feature map, no decay (linear attention): per-head q.k^T / sqrt(d) equals the teacher's
    pre-RoPE attention logits, GQA expanded like repeat_kv, with head_dim 24 != hidden / heads."""
    student = convert(teacher, "linear_attention", feature_map="identity")
    x = torch.randn(2, 7, 64)
    attn = teacher.model.layers[1].self_attn
    q = attn.q_proj(x).view(2, 7, 4, 24).transpose(1, 2)  # (B, H, T, d)
    k = attn.k_proj(x).view(2, 7, 2, 24).transpose(1, 2).repeat_interleave(2, dim=1)  # (B, H, T, d)
    expected = torch.tril(q @ k.transpose(-1, -2) / 24 ** 0.5)  # (B, H, T, T)
    with torch.no_grad():
        got = student.model.layers[1].self_attn.mixer.materialize(x)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-5)


def test_padding_left_matches_unpadded(teacher):
    student = convert(teacher, "gla").eval()
    ids = _prompt(batch=1, steps=6)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    with torch.no_grad():
        a = student(ids).logits
        b = student(padded, attention_mask=mask).logits[:, 3:]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_random_init_transformer_differs_and_qkv_copy_is_teacher(teacher):
    ids = _prompt()
    with torch.no_grad():
        t = teacher(ids).logits
        torch.testing.assert_close(convert(teacher, "transformer")(ids).logits, t, rtol=0, atol=1e-5)
        assert (convert(teacher, "transformer", init="random")(ids).logits - t).abs().max() > 1e-2


def test_bad_input_one_line(teacher):
    with pytest.raises(ConfigError, match="known: linear_attention"):
        convert(teacher, "s4")
    with pytest.raises(ConfigError, match=r"out of range.*3 layers"):
        convert(teacher, "gla", attention_layers=[3])
    with pytest.raises(ConfigError, match="supported causal-LM families"):
        convert(torch.nn.Linear(2, 2), "gla")
    with pytest.raises(ConfigError, match=r"\(96, 64\).*\(64, 64\)|\(64, 64\).*\(96, 64\)|does not fit|cannot copy"):
        convert(teacher, "gla", head_dim=16)
    for err in (ConfigError,):
        try:
            convert(teacher, "gla", head_dim=16)
        except err as e:
            assert "\n" not in str(e)


def test_registered_after_import_opdf_exp(teacher, tmp_path):
    import subprocess
    import sys

    convert(teacher, "retnet").save_pretrained(tmp_path)
    code = ("import opdf_exp, transformers; m = transformers.AutoModelForCausalLM.from_pretrained(r'%s'); "
            "print(type(m).__name__)" % tmp_path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith("SubquadraticLlamaForCausalLM"), out.stderr[-500:]


def test_qwen2_teacher_with_qkv_biases():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        initializer_range=0.1)).eval()
    ids = _prompt(batch=1)
    with torch.no_grad():
        torch.testing.assert_close(convert(qwen, "transformer")(ids).logits, qwen(ids).logits, rtol=0, atol=1e-5)
        student = convert(qwen, "gla", attention_layers=[1])
    torch.testing.assert_close(student.model.layers[0].self_attn.mixer.q_proj.bias,
                               qwen.model.layers[0].self_attn.q_proj.bias)


def _left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(p.numel() for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)  # 0 is the pad id
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - p.numel():], mask[row, width - p.numel():] = p, 1
    return ids, mask


@pytest.mark.parametrize("arch,attention_layers", [(a, []) for a in list_mixers()] + [("gla", [1])])
def test_batched_left_padded_generation_matches_one_by_one(teacher, arch, attention_layers):
    """Left padding must leave every mixer's state as it would be without the pads (zero keys/values and conv
    inputs, neutral decay), and kept attention layers must see the right positions: each prompt of a padded
    batch continues greedily exactly as it does alone."""
    student = convert(teacher, arch, attention_layers=attention_layers).eval()
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, VOCAB, (n,), generator=gen) for n in (7, 3, 11)]
    ids, mask = _left_padded(prompts)
    new = 6
    with torch.no_grad():
        out = student.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        batched, scores = out.sequences[:, ids.shape[1]:], torch.stack(out.scores, 1)  # (B, new), (B, new, V)
        for row, p in enumerate(prompts):
            alone = student.generate(p[None], attention_mask=torch.ones_like(p[None]), max_new_tokens=new,
                                     min_new_tokens=new, do_sample=False, pad_token_id=0, output_scores=True,
                                     return_dict_in_generate=True)
            assert torch.equal(batched[row], alone.sequences[0, p.numel():]), f"{arch} prompt {row} ({p.numel()})"
            torch.testing.assert_close(scores[row], torch.stack(alone.scores, 1)[0], rtol=0, atol=1e-4)
        # the check has teeth: the same padded batch with the pads unmasked continues differently
        leaky = student.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    assert not torch.allclose(torch.stack(leaky.scores, 1)[1], scores[1], atol=1e-4)


def test_throughput_warms_up_untimed_then_takes_the_best_of_repeats(teacher, monkeypatch):
    from opdf_exp.subquadratic import evaluate as ev

    student = convert(teacher, "gla").eval()
    prefills = []
    student.register_forward_pre_hook(lambda m, a, kw: prefills.append(1) if kw["input_ids"].shape[1] > 1 else None,
                                      with_kwargs=True)
    # (prefill s, decode s) per call: the warm-up is the fastest, so counting it would show; the best prefill and
    # the best decode come from different repeats
    durations = [(0.1, 0.1), (2.0, 2.0), (1.0, 4.0), (4.0, 1.0)]
    ticks, now = [], 0.0
    for prefill, decode in durations:
        ticks += [now, now + prefill, now + prefill + decode]  # perf_counter at start, after prefill, at the end
        now += prefill + decode
    clock = iter(ticks)
    monkeypatch.setattr(ev.time, "perf_counter", lambda: next(clock))
    out = ev.throughput(student, prompt_len=8, decode_steps=2, repeats=3)
    assert len(prefills) == 1 + 3
    assert out == {"prefill_tokens_per_s": 8.0, "decode_tokens_per_s": 2.0}
    prefills.clear()
    monkeypatch.setattr(ev.time, "perf_counter", iter(range(100)).__next__)
    ev.throughput(student, prompt_len=8, decode_steps=2, repeats=2, warmup=False)
    assert len(prefills) == 2


@pytest.mark.parametrize("arch", ["linear_attention", "retnet", "gla", "gated_deltanet"])
def test_rope_students_generate_with_their_cache_as_one_pass_and_reload(teacher, arch, tmp_path):
    """student.rope=true: the decoder's rotary tables reach the mixers in one pass, in chunked prefill and in each
    generation step (positions continue from the cache), and the option survives save/reload."""
    student = convert(teacher, arch, rope=True).eval()
    assert all(m.rope for m in student.mixers().values())
    ids = _prompt()
    with torch.no_grad():
        out = student.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True,
                               return_dict_in_generate=True)
        full = student(out.sequences).logits[:, ids.shape[1] - 1:-1]
        student.save_pretrained(tmp_path)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(reloaded(ids).logits, student(ids).logits, rtol=0, atol=1e-6)
        plain = convert(teacher, arch).eval()
        assert not torch.allclose(plain(ids).logits, student(ids).logits, atol=1e-4)
    assert torch.equal(full.argmax(-1), out.sequences[:, ids.shape[1]:])
    torch.testing.assert_close(torch.stack(out.scores, 1), full, rtol=0, atol=1e-4)


def test_perplexity_by_position_bins_partition_the_whole_block_score(teacher):
    """Position bins are a partition: token-weighted, their NLL and KL add up to the whole-block numbers of
    perplexity_and_kl; a bin is checked against a hand computation of its positions."""
    import math

    import torch.nn.functional as F

    from opdf_exp.subquadratic import evaluate as ev

    torch.manual_seed(1)
    student = convert(teacher, "gla")
    blocks = torch.randint(0, VOCAB, (3, 24))
    whole = ev.perplexity_and_kl(student, teacher, blocks, batch_size=2)
    rows = ev.perplexity_by_position(student, teacher, blocks, edges=(1, 8, 16, 24), batch_size=2)
    assert [r["tokens"] for r in rows] == [3 * 7, 3 * 8, 3 * 8]  # predicted positions 1-7, 8-15, 16-23
    assert sum(r["tokens"] for r in rows) == whole["eval_tokens"]
    nll = sum(r["tokens"] * math.log(r["perplexity"]) for r in rows) / whole["eval_tokens"]
    assert nll == pytest.approx(math.log(whole["perplexity"]), rel=1e-5)
    kl = sum(r["tokens"] * r["kl_per_token"] for r in rows) / whole["eval_tokens"]
    assert kl == pytest.approx(whole["kl_per_token"], rel=1e-4)
    with torch.no_grad():  # the middle bin by hand: predicted positions 8..15 are logits 7..14
        logp = F.log_softmax(student(input_ids=blocks).logits.float(), -1)[:, 7:15]
        hand = -logp.gather(-1, blocks[:, 8:16, None])[..., 0].mean().item()
    assert math.log(rows[1]["perplexity"]) == pytest.approx(hand, rel=1e-5)
    with pytest.raises(ValueError, match="edges"):
        ev.perplexity_by_position(student, None, blocks, edges=(0, 24))
