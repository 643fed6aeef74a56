"""helpers.quant: storage arithmetic, the BitsAndBytesConfig builder, and byte accounting of loaded models.

Tiny Llama built from a config (no downloads): 2 layers, hidden 64, MLP 128, vocab 256, untied head.
Per layer: q/k/v/o 64x64 (4096 weights each) + gate/up 128x64 + down 64x128 (8192 each) = 40960 weights,
7 Linears, 576 output rows; the model: 81920 quantizable weights in 14 Linears with 1152 rows in total.
"""

from __future__ import annotations

import pytest
import torch

from helpers import models, quant

VOCAB, HIDDEN, INTER, LAYERS = 256, 64, 128, 2
Q_WEIGHTS = LAYERS * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER)  # 81920
Q_ROWS = LAYERS * (4 * HIDDEN + 2 * INTER + HIDDEN)  # 1152
EMBED = VOCAB * HIDDEN  # 16384, the embedding and (untied) the head each
NORMS = (2 * LAYERS + 1) * HIDDEN  # 320
ROTARY_BUFFER_BYTES = 2 * (HIDDEN // 4 // 2) * 4  # inv_freq + original_inv_freq: head_dim/2 fp32 values each


def tiny_llama(tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    return str(path)


# ------------------------------------------------------------------------------------ arithmetic


def test_bits_per_param_by_format():
    assert quant.bits_per_param("fp32") == 32 and quant.bits_per_param("bf16") == 16
    assert quant.bits_per_param("nf4") == 4.5  # 4 bits + one fp32 absmax per 64 weights
    assert quant.bits_per_param("nf4", double_quant=True) == pytest.approx(4 + 8 / 64 + 64 / (64 * 256))
    assert quant.bits_per_param("nf4", blocksize=128) == 4.25
    with pytest.raises(ValueError, match="unknown precision"):
        quant.bits_per_param("int3")


def test_weight_bytes_int8_adds_row_scales_and_the_rest_stays_in_keep():
    assert quant.weight_bytes(1000, "int8", rows=10) == 1000 + 40
    assert quant.weight_bytes(6400, "nf4") == 6400 * 4.5 / 8
    # 640 of 1000 weights in NF4 (4.5 bits), the other 360 in fp16 (2 bytes); a 16-bit format ignores `quantized`
    assert quant.weight_bytes(1000, "nf4", quantized=640, keep="fp16") == 640 * 4.5 / 8 + 360 * 2
    assert quant.weight_bytes(1000, "bf16", quantized=640, keep="fp32") == 2000
    with pytest.raises(ValueError, match="between 0 and n_params"):
        quant.weight_bytes(10, "nf4", quantized=11)


def test_bnb_config_and_validation():
    cfg = quant.bnb_config("nf4", compute_dtype="bfloat16", double_quant=True)
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16
    assert quant.bnb_config("int8").load_in_8bit
    assert quant.bnb_config(None) is None
    with pytest.raises(ValueError, match="quantization must be one of"):
        quant.bnb_config("q4_k")
    with pytest.raises(ValueError, match="4-bit formats only"):
        quant.bnb_config("int8", double_quant=True)


# ------------------------------------------------------------------------------------ accounting


def test_theoretical_bytes_on_full_precision_model():
    model = tiny_llama()
    names = [n for n, _, _ in quant.quantizable_linears(model)]
    assert len(names) == 14 and "lm_head" not in names  # the head stays in full precision
    th = quant.theoretical_bytes(model, "nf4")
    assert th["quantized_params"] == Q_WEIGHTS
    assert th["quantized_bytes"] == Q_WEIGHTS * 4.5 / 8
    assert th["full_precision_params"] == 2 * EMBED + NORMS
    assert th["full_precision_bytes"] == 4 * (2 * EMBED + NORMS) + ROTARY_BUFFER_BYTES
    int8 = quant.theoretical_bytes(model, "int8")
    assert int8["quantized_bytes"] == Q_WEIGHTS + 4 * Q_ROWS
    half = quant.theoretical_bytes(model, "nf4", other_precision="fp16")
    assert half["full_precision_bytes"] == 2 * (2 * EMBED + NORMS) + ROTARY_BUFFER_BYTES / 2


def test_theoretical_bytes_on_meta_skeleton():
    with torch.device("meta"):
        model = tiny_llama()
    assert quant.theoretical_bytes(model, "nf4")["quantized_params"] == Q_WEIGHTS


def test_quantizable_linears_rule_for_plain_modules_and_no_swallowed_errors(monkeypatch):
    from torch import nn

    class Plain(nn.Module):  # not a transformers model: every Linear but the output head
        def __init__(self):
            super().__init__()
            self.up, self.down, self.out = nn.Linear(4, 8), nn.Linear(8, 4), nn.Linear(4, 16)

        def get_output_embeddings(self):
            return self.out

    assert quant.quantizable_linears(Plain()) == [("up", 32, 8), ("down", 32, 4)]
    # a transformers model whose rule fails raises: no silent switch to another rule (and another count)
    import transformers.quantizers.base

    def broken(model):
        raise RuntimeError("get_keys_to_not_convert failed")

    monkeypatch.setattr(transformers.quantizers.base, "get_keys_to_not_convert", broken)
    with pytest.raises(RuntimeError, match="get_keys_to_not_convert failed"):
        quant.quantizable_linears(tiny_llama())


def test_full_precision_model_has_nothing_quantized():
    acc = quant.quantized_linear_bytes(tiny_llama(tie=True))
    assert acc["quantized_layers"] == 0 and acc["quantized_bytes"] == 0
    assert acc["full_precision_params"] == EMBED + Q_WEIGHTS + NORMS  # tied head counted once
    assert acc["full_precision_by_kind"]["embedding"] == 4 * EMBED and acc["full_precision_by_kind"]["head"] == 0


def test_full_precision_kinds_follow_helpers_roles():
    """Biased Phi: Linear weights are 'linear', their biases 'bias'; the head's bias counts with the head."""
    from transformers import PhiConfig, PhiForCausalLM

    with torch.device("meta"):
        model = PhiForCausalLM(PhiConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                                         num_hidden_layers=LAYERS, num_attention_heads=4))
    kinds = quant.quantized_linear_bytes(model)["full_precision_by_kind"]
    assert set(kinds) == set(quant.FULL_PRECISION_KINDS)
    assert kinds["embedding"] == 4 * EMBED and kinds["head"] == 4 * (EMBED + VOCAB)
    assert kinds["linear"] == 4 * Q_WEIGHTS - 4 * LAYERS * HIDDEN * INTER  # Phi: fc1/fc2, no gate
    assert kinds["bias"] == 4 * LAYERS * (4 * HIDDEN + INTER + HIDDEN)
    assert kinds["norm"] == 4 * 2 * (LAYERS + 1) * HIDDEN and kinds["other"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_bytes_match_hand_count(tiny_folder, double_quant):
    model = models.load_model(tiny_folder, quantization="nf4", double_quant=double_quant)
    acc = quant.quantized_linear_bytes(model)
    assert acc["formats"] == {"nf4": 14} and acc["quantized_params"] == Q_WEIGHTS
    assert acc["packed_weight_bytes"] == Q_WEIGHTS // 2
    blocks = Q_WEIGHTS // 64
    if double_quant:
        # uint8 absmax per block; per layer an fp32 offset, one fp32 nested absmax (<= 256 blocks each here),
        # and two lookup tables: 16 fp32 NF4 values + 256 fp32 values of the 8-bit dynamic map
        expected_state = blocks + 14 * 4 + 14 * 4 + 14 * (16 + 256) * 4
        assert acc["code_table_bytes"] == 14 * (16 + 256) * 4
    else:
        expected_state = blocks * 4 + 14 * 16 * 4  # fp32 absmax per block + the NF4 table per layer
        assert acc["code_table_bytes"] == 14 * 16 * 4
    assert acc["quant_state_bytes"] == expected_state
    assert acc["full_precision_by_kind"]["head"] == 4 * EMBED and acc["full_precision_by_kind"]["embedding"] == 4 * EMBED
    # the storage formula = measured minus the lookup tables (a fixed cost per layer)
    th = quant.theoretical_bytes(model, "nf4", double_quant=double_quant)
    assert acc["quantized_bytes"] - acc["code_table_bytes"] == pytest.approx(th["quantized_bytes"], rel=0.02)
    # transformers' footprint misses the quant state; ours is parameters + buffers + quant state
    assert acc["total_bytes"] == model.get_memory_footprint() + acc["quant_state_bytes"]


@pytest.mark.slow
def test_int8_bytes_match_hand_count(tiny_folder):
    model = models.load_model(tiny_folder, quantization="int8")
    acc = quant.quantized_linear_bytes(model)
    assert acc["formats"] == {"int8": 14}
    assert acc["packed_weight_bytes"] == Q_WEIGHTS and acc["quant_state_bytes"] == 4 * Q_ROWS
    assert acc["quantized_bytes"] == quant.theoretical_bytes(model, "int8")["quantized_bytes"]


@pytest.mark.slow
def test_cpu_repack_is_detected(tiny_folder):
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
    model = models.load_model(tiny_folder, quantization="nf4")
    assert quant.cpu_repacked_layers(model) == []
    model.train()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert quant.cpu_repacked_layers(model) == []  # train mode: no repack
    model.eval()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert len(quant.cpu_repacked_layers(model)) == 14
    assert quant.quantized_linear_bytes(model)["repacked_for_cpu"] == 14
