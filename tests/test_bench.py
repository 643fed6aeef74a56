"""helpers.bench: perplexity with hand-computed values, peak memory, timing, footprint, generation speed, 4-bit guard.

Models are either fakes whose logits we set, or tiny Llamas built from a config (no downloads).
"""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from helpers import bench, models, quant


class IdTokenizer:
    """A 'tokenizer' whose text is space-separated token ids, so tests choose the tokens exactly."""

    pad_token_id = 0
    eos_token_id = 0

    def __call__(self, text, return_tensors=None):
        ids = [int(t) for t in text.split()]
        return {"input_ids": torch.tensor([ids]) if return_tensors else ids}


class TableLM(nn.Module):
    """Next-token logits depend only on the current token: logits = table[token]."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table.clone())
        self.dropout = nn.Dropout(0.5)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.dropout(self.table[input_ids]))


def tiny_llama(vocab=256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


# ------------------------------------------------------------------------------------ perplexity


def test_uniform_logits_give_perplexity_equal_to_vocab_size():
    model = TableLM(torch.zeros(7, 7))
    assert bench.perplexity(model, IdTokenizer(), "1 2 3 4 5 6") == pytest.approx(7.0, rel=1e-6)


def test_bigram_perplexity_matches_hand_computation():
    # token 1 -> token 2 with p = 0.5, token 2 -> token 1 with p = 0.25 (rest spread over the other tokens)
    table = torch.full((4, 4), -1e9)
    table[1] = torch.log(torch.tensor([1 / 6, 1 / 6, 0.5, 1 / 6]))
    table[2] = torch.log(torch.tensor([0.25, 0.25, 0.25, 0.25]))
    model = TableLM(table)
    # "1 2 1 2 1": predicted 2 (0.5), 1 (0.25), 2 (0.5), 1 (0.25)
    expected = math.exp(-(2 * math.log(0.5) + 2 * math.log(0.25)) / 4)
    assert bench.perplexity(model, IdTokenizer(), "1 2 1 2 1") == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(math.sqrt(8))


def test_windows_and_token_weighting():
    table = torch.randn(5, 5)
    model, tok = TableLM(table), IdTokenizer()
    # 10 tokens, windows of 4: [4, 4, 2] -> 3 + 3 + 1 = 7 predicted tokens
    res = bench.token_nll(model, tok, "1 2 3 4 1 2 3 4 1 2", max_length=4)
    assert res["n_tokens"] == 7 and res["n_windows"] == 3
    logp = torch.log_softmax(table, -1)
    pairs = [(1, 2), (2, 3), (3, 4), (1, 2), (2, 3), (3, 4), (1, 2)]
    assert res["nll_sum"] == pytest.approx(-sum(float(logp[a, b]) for a, b in pairs), rel=1e-5)
    # token-weighted over texts: one 3-token text and one 5-token text = one 8-token pool of predictions
    two = bench.token_nll(model, tok, ["1 2 3", "4 1 2 3 4"], max_length=512, batch_size=2)
    assert two["n_tokens"] == 2 + 4
    one = bench.token_nll(model, tok, ["1 2 3", "4 1 2 3 4"], max_length=512, batch_size=1)
    assert two["nll_sum"] == pytest.approx(one["nll_sum"], rel=1e-9)


def test_perplexity_runs_without_dropout_and_restores_mode():
    model = TableLM(torch.randn(6, 6))
    model.train()
    runs = {bench.perplexity(model, IdTokenizer(), "1 2 3 4 5") for _ in range(3)}
    assert len(runs) == 1  # dropout would make these differ
    assert model.training and model.dropout.training


@pytest.mark.slow
def test_perplexity_equals_exp_of_model_loss_and_padding_is_ignored():
    model = tiny_llama()
    tok = IdTokenizer()
    ids = torch.randint(1, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    text = " ".join(map(str, ids[0].tolist()))
    assert bench.perplexity(model, tok, text) == pytest.approx(math.exp(float(loss)), rel=1e-5)
    short = " ".join(map(str, ids[0, :9].tolist()))
    a = bench.token_nll(model, tok, [text, short], batch_size=1)
    b = bench.token_nll(model, tok, [text, short], batch_size=2)  # the short one is right-padded
    assert a["n_tokens"] == b["n_tokens"] == 39 + 8
    assert a["nll_sum"] == pytest.approx(b["nll_sum"], rel=1e-5)


# ------------------------------------------------------------------------------------ memory, timing


def test_peak_memory_sees_a_200_mb_allocation():
    with bench.PeakMemory("cpu") as pm:
        block = torch.ones(50_000_000)  # 200 MB of fp32, touched by the fill
        time.sleep(0.1)
        del block
    assert pm.device == "cpu"
    assert 190e6 <= pm.delta_bytes <= 400e6, pm
    assert pm.peak_bytes >= pm.start_bytes + pm.delta_bytes - 1


def test_peak_memory_of_nothing_is_small_and_bad_device_raises():
    with bench.PeakMemory("cpu") as pm:
        time.sleep(0.03)
    assert pm.delta_bytes < 20e6
    with pytest.raises(ValueError, match="device must be"):
        bench.PeakMemory("tpu")


def test_time_call_counts_warmup_and_repeats():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.01)
        return len(calls)

    res = bench.time_call(fn, warmup=2, repeats=3)
    assert len(calls) == 5 and len(res["all"]) == 3 and res["result"] == 5
    assert 0.01 <= res["min"] <= res["median"] < 0.5


def test_model_footprint_counts_tied_tensors_once():
    model = tiny_llama()
    n = sum(p.numel() for p in model.parameters())
    assert n == 2 * 256 * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert bench.model_footprint(model) == 4 * n + buffers == model.get_memory_footprint()
    model.lm_head.weight = model.model.embed_tokens.weight  # tie
    assert bench.model_footprint(model) == 4 * (n - 256 * 64) + buffers


# ------------------------------------------------------------------------------------ generation


@pytest.mark.slow
def test_generation_speed_counts_tokens_and_is_greedy():
    model = tiny_llama()
    tok = IdTokenizer()
    tok.decode = lambda ids, skip_special_tokens=True: " ".join(map(str, ids.tolist()))
    res = bench.generation_speed(model, tok, ["5 6 7 8", "9 10 11"], max_new_tokens=6, warmup=1, repeats=2)
    assert res["new_tokens"] == 12 and res["prompt_tokens"] == 7 and res["repeats"] == 2
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "ttft_s", "total_s"):
        assert res[key] > 0, key
    assert res["ttft_s"] * 2 < res["total_s"]  # one token is cheaper than six, for both prompts
    again = bench.generation_speed(model, tok, ["5 6 7 8", "9 10 11"], max_new_tokens=6, warmup=0, repeats=1)
    assert again["texts"] == res["texts"] and len(res["texts"][0].split()) == 6
    # warm-up passes are short (the first call's one-time costs do not depend on its length); timed ones are not
    asked, generate = [], model.generate
    model.generate = lambda **kw: asked.append(kw["max_new_tokens"]) or generate(**kw)
    bench.generation_speed(model, tok, ["5 6 7 8", "9 10 11"], max_new_tokens=6, warmup=1, repeats=1, warmup_tokens=2)
    assert asked == [2, 2, 1, 6, 1, 6]


# ------------------------------------------------------------------------------------ the 4-bit CPU guard


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-bench")
    tiny_llama().save_pretrained(path)
    return str(path)


@pytest.mark.slow
def test_guarded_perplexity_keeps_4bit_model_trainable(tiny_folder):
    from bitsandbytes.functional import has_avx512bf16
    from peft import LoraConfig, get_peft_model

    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
    tok = IdTokenizer()
    text = " ".join(str(i) for i in range(1, 60))
    ids = torch.arange(1, 33)[None]
    for guard in (True, False):
        model = models.load_model(tiny_folder, quantization="nf4")
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
        ppl = bench.perplexity(peft_model, tok, text, guard_4bit=guard)
        assert math.isfinite(ppl)
        repacked = quant.cpu_repacked_layers(peft_model)
        peft_model.train()
        peft_model(input_ids=ids, labels=ids).loss.backward()
        # lora_B starts at zero, so only the B factors get a gradient on the first step
        b_grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
        nonzero = sum(g is not None and bool(g.abs().sum() > 0) for g in b_grads)
        if guard:
            assert repacked == [] and nonzero == len(b_grads) == 14
        else:
            assert len(repacked) == 14 and nonzero < len(b_grads)  # the silent bug, reproduced
