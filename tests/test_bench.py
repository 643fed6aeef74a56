"""helpers.bench: peak memory, timing, footprint, generation speed, the 4-bit guard (perplexity: test_evals.py).

Models are either fakes whose logits we set, or tiny Llamas built from a config (no downloads).
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from conftest import IdTokenizer

from helpers import bench, evals, models, quant


def tiny_llama(vocab=256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


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
    with pytest.raises(ValueError, match="measure must be"):
        bench.PeakMemory("cpu", measure="vms")


def test_live_memory_leaves_out_what_the_allocator_keeps():
    now = bench.process_memory()
    assert now["live"] == now["rss"] - now["allocator_free"] and now["allocator_free"] >= 0
    torch.ones(4_000_000).add_(1)                        # freeing a 16 MB mmap raises glibc's mmap threshold to 16 MB
    blocks = [torch.ones(250_000) for _ in range(200)]  # so these 200 x 1 MB come from the heap
    del blocks[::2]                                      # every other block freed: holes the heap keeps
    with bench.PeakMemory("cpu", measure="live") as pm:
        time.sleep(0.05)
    assert pm.kind == "live" and pm.peak_rss_bytes - pm.peak_bytes >= 0
    if bench.allocator_free_bytes() is not None:         # glibc: the holes are free heap, not live memory
        assert bench.process_memory()["allocator_free"] >= 50e6
    with bench.PeakMemory("cpu", measure="live") as pm:
        block = torch.ones(50_000_000)
        time.sleep(0.1)
        del block
    assert 190e6 <= pm.delta_bytes <= 400e6, pm
    assert pm.as_dict()["kind"] == "live" and pm.as_dict()["peak_rss_bytes"] >= pm.as_dict()["peak_bytes"]


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


def test_rss_sampling_leaves_the_allocator_alone(monkeypatch):
    """Sampling RSS must not walk malloc's heap (mallinfo2 takes its lock): it slowed what was being timed."""
    calls = []
    real = bench.process_memory
    monkeypatch.setattr(bench, "process_memory", lambda: calls.append(1) or real())
    with bench.PeakMemory("cpu", interval=0.005):
        time.sleep(0.1)
    assert len(calls) == 2  # entry and exit only, not ~20 samples
    with bench.PeakMemory("cpu", interval=0.005, measure="live"):
        time.sleep(0.1)
    assert len(calls) > 6


# ------------------------------------------------------------------------------------ generation


def test_timing_protocol_recovers_known_prefill_and_decode_rates():
    """A fake runtime whose calls take 20 ms + 1 ms per prompt token + 5 ms per new token: 200 decode tokens/s."""
    def generate(i, n):
        time.sleep(0.020 + 0.001 * (10 + i) + 0.005 * n)
        return 10 + i, n, "x" * n

    res = bench.time_generation(generate, n_prompts=2, max_new_tokens=41, warmup=1, repeats=3)
    assert res["prompt_tokens"] == 21 and res["new_tokens"] == 82 and res["texts"] == ["x" * 41] * 2
    assert 150 < res["decode_tokens_per_s"] < 215  # 80 tokens / (80 x 5 ms), give or take the sleeps' jitter
    assert 0.026 <= res["ttft_s"] < 0.045          # 20 + 10.5 + 5 ms per prompt
    with pytest.raises(ValueError, match=">= 2"):
        bench.time_generation(generate, 1, max_new_tokens=1)


@pytest.mark.slow
def test_generation_speed_counts_tokens_and_is_greedy():
    model = tiny_llama()
    tok = IdTokenizer()
    tok.decode = lambda ids, skip_special_tokens=True: " ".join(map(str, ids.tolist()))
    # 24 new tokens against 1: the gap stays clear on a loaded machine (6 tokens sometimes timed no slower than 1)
    res = bench.generation_speed(model, tok, ["5 6 7 8", "9 10 11"], max_new_tokens=24, warmup=1, repeats=2)
    assert res["new_tokens"] == 48 and res["prompt_tokens"] == 7 and res["repeats"] == 2
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "ttft_s", "total_s"):
        assert res[key] > 0, key
    assert res["ttft_s"] * 2 < res["total_s"]  # one token is cheaper than 24, for both prompts
    again = bench.generation_speed(model, tok, ["5 6 7 8", "9 10 11"], max_new_tokens=24, warmup=0, repeats=1)
    assert again["texts"] == res["texts"] and len(res["texts"][0].split()) == 24
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
        ppl = evals.perplexity(peft_model, tok, text, guard_4bit=guard)  # runs in bench.eval_mode
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
