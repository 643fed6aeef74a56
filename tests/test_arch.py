"""helpers.arch: shipped configs, meta-device skeletons, parameter counts by role, memory by precision."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import arch

PHI2_PARAMS = 2_779_683_840
PHI15_PARAMS = 1_418_270_720


def phi_params(hidden: int, layers: int, ff: int, vocab: int) -> int:
    """Closed form for native PhiForCausalLM: biased q/k/v/dense and fc1/fc2, one LayerNorm a block, biased head."""
    attn = 4 * (hidden * hidden + hidden)
    mlp = (hidden * ff + ff) + (ff * hidden + hidden)
    block = attn + mlp + 2 * hidden
    return vocab * hidden + layers * block + 2 * hidden + (vocab * hidden + vocab)


def llama_params(hidden: int, layers: int, ff: int, vocab: int, kv_dim: int) -> int:
    """Closed form for LlamaForCausalLM / MistralForCausalLM: bias-free q/o (hidden²) and k/v (hidden × kv_dim),
    gate/up/down (hidden × ff each), two RMSNorm weights a block, a final norm, untied embedding and head."""
    block = 2 * hidden * hidden + 2 * hidden * kv_dim + 3 * hidden * ff + 2 * hidden
    return 2 * vocab * hidden + layers * block + hidden


@pytest.fixture(scope="module")
def skeletons():
    return {name: arch.meta_model(arch.load_config(name)) for name in arch.config_names()}


def test_shipped_configs_have_provenance():
    readme = (arch.CONFIG_DIR / "README.md").read_text()
    names = arch.config_names()
    assert set(names) == set(arch.HUB_IDS)
    for name in names:
        assert f"`{name}.json`" in readme and arch.HUB_IDS[name] in readme
        raw = arch.load_config_dict(name)
        if "_name_or_path" in raw:
            assert raw["_name_or_path"] in (arch.HUB_IDS[name], arch.HUB_IDS[name].split("/")[-1])


def test_load_config_by_name_and_hub_id():
    cfg = arch.load_config("phi-1.5")
    assert type(cfg).__name__ == "PhiConfig"
    assert arch.load_config("microsoft/phi-1_5").to_dict() == cfg.to_dict()
    assert type(arch.load_config("llama-2-70b")).__name__ == "LlamaConfig"
    with pytest.raises(FileNotFoundError, match="available"):
        arch.load_config("phi-3")


def test_shapes_match_the_hub_configs(skeletons):
    phi2 = arch.shape_summary(arch.load_config("phi-2"), skeletons["phi-2"])
    assert (phi2["layers"], phi2["hidden_size"], phi2["heads"], phi2["head_dim"]) == (32, 2560, 32, 80)
    assert phi2["rotary_dims"] == 32 and phi2["intermediate_size"] == 10240 and phi2["vocab_rows"] == 51200
    phi15 = arch.shape_summary(arch.load_config("phi-1.5"), skeletons["phi-1.5"])
    assert (phi15["layers"], phi15["hidden_size"], phi15["head_dim"], phi15["rotary_dims"]) == (24, 2048, 64, 32)
    assert phi15["vocab_rows"] > arch.TOKENIZER_LENGTH["phi-1.5"]
    assert arch.shape_summary(arch.load_config("llama-2-70b"))["kv_heads"] == 8


def test_seed_claim_24_layers_head_dim_64_is_phi_1_5_not_phi_2():
    phi = ["phi-1", "phi-1.5", "phi-2"]
    assert arch.find_configs(phi, layers=24, head_dim=64) == ["phi-1", "phi-1.5"]
    assert "qwen2.5-0.5b" in arch.find_configs(layers=24, head_dim=64)  # a 2024 model shares the shape
    assert arch.find_configs(phi, layers=32, head_dim=80) == ["phi-2"]
    with pytest.raises(KeyError):
        arch.find_configs(depth=24)


def test_parameter_counts_exact(skeletons):
    totals = {n: sum(p.numel() for p in m.parameters()) for n, m in skeletons.items()}
    assert totals["phi-2"] == PHI2_PARAMS == phi_params(2560, 32, 10240, 51200)
    assert totals["phi-1.5"] == PHI15_PARAMS == phi_params(2048, 24, 8192, 51200) == totals["phi-1"]
    # the model cards round these to 7B/13B/70B and 7.24B; the exact numbers are the closed form
    assert totals["llama-2-7b"] == 6_738_415_616 == llama_params(4096, 32, 11008, 32000, kv_dim=4096)
    assert totals["llama-2-13b"] == 13_015_864_320 == llama_params(5120, 40, 13824, 32000, kv_dim=5120)
    assert totals["llama-2-70b"] == 68_976_648_192 == llama_params(8192, 80, 28672, 32000, kv_dim=8 * 128)  # GQA
    assert totals["mistral-7b"] == 7_241_732_096 == llama_params(4096, 32, 14336, 32000, kv_dim=8 * 128)
    assert all(p.device.type == "meta" for p in skeletons["llama-2-70b"].parameters())


def test_todays_configs_build_the_published_architectures(skeletons):
    """Oracles: the Phi-4-mini report (32 layers, hidden 3072, 24 query / 8 KV heads, 200K vocabulary), the Qwen3
    model cards (28 layers, 16 / 8 heads) and the Gemma-3-270M GGUF on PyPI (18 layers, width 640, 4 / 1 heads)."""
    summary = {n: arch.shape_summary(arch.load_config(n), skeletons[n]) for n in arch.config_names()}
    phi4 = summary["phi-4-mini-instruct"]
    assert (phi4["layers"], phi4["hidden_size"], phi4["heads"], phi4["kv_heads"]) == (32, 3072, 24, 8)
    assert phi4["vocab_rows"] == 200_064 and phi4["rotary_dims"] == 96  # 3/4 of a 128-wide head, read from the buffer
    roles = arch.count_params_by_role(skeletons["phi-4-mini-instruct"])
    assert roles["qkv_proj"] == 32 * 3072 * (24 + 2 * 8) * 128 and roles["gate_up_proj"] == 32 * 3072 * 2 * 8192
    assert not {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"} & set(roles)
    for name in ("qwen3-0.6b", "qwen3-1.7b"):
        assert (summary[name]["layers"], summary[name]["heads"], summary[name]["kv_heads"]) == (28, 16, 8)
    g270 = summary["gemma-3-270m-it"]
    assert (g270["layers"], g270["hidden_size"], g270["heads"], g270["kv_heads"], g270["head_dim"]) == (18, 640, 4, 1, 256)


def test_gemma_files_say_the_same_layer_pattern_two_ways():
    """The 270M file lists `layer_types`; the 1B file gives `sliding_window_pattern` 6: both mean five sliding-window
    layers, then one global layer (the 5:1 interleaving of the Gemma 3 report, arXiv:2503.19786); 512-token windows."""
    for name in ("gemma-3-270m-it", "gemma-3-1b-it"):
        cfg = arch.load_config(name)
        types = cfg.layer_types
        assert len(types) == cfg.num_hidden_layers and cfg.sliding_window == 512
        assert [i for i, t in enumerate(types) if t == "full_attention"] == list(range(5, cfg.num_hidden_layers, 6))
    assert "layer_types" not in arch.load_config_dict("gemma-3-1b-it")


def test_count_params_by_role_phi2(skeletons):
    roles = arch.count_params_by_role(skeletons["phi-2"])
    assert sum(roles.values()) == PHI2_PARAMS
    assert roles["embedding"] == 51200 * 2560
    assert roles["head"] == 51200 * 2560 + 51200
    for name in ("q_proj", "k_proj", "v_proj", "dense"):
        assert roles[name] == 32 * (2560 * 2560 + 2560)
    assert roles["fc1"] == 32 * (2560 * 10240 + 10240)
    assert roles["fc2"] == 32 * (10240 * 2560 + 2560)
    assert roles["norm"] == 33 * 2 * 2560
    assert "other" not in roles
    groups = arch.group_roles(roles, skeletons["phi-2"])
    assert groups["attention"] == 4 * roles["q_proj"] and groups["mlp"] == roles["fc1"] + roles["fc2"]
    assert sum(groups.values()) == PHI2_PARAMS


def test_count_params_by_role_llama_names_and_tied_head():
    cfg = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)  # real tensors: the tied head shares the embedding's weight
    roles = arch.count_params_by_role(model)
    assert sum(roles.values()) == sum(p.numel() for p in model.parameters())
    assert roles["embedding"] == 1600 and "head" not in roles
    assert roles["k_proj"] == 2 * 16 * 8 and roles["gate_proj"] == 2 * 16 * 32
    assert roles["norm"] == (2 * 2 + 1) * 16
    assert arch.group_roles(roles, model)["mlp"] == 3 * 2 * 16 * 32


def test_quantizable_excludes_the_head(skeletons):
    weights, rows = arch.quantizable(skeletons["phi-2"])
    assert weights == 32 * (4 * 2560 * 2560 + 2 * 2560 * 10240)
    assert rows == 32 * (4 * 2560 + 10240 + 2560)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama-untied", "llama-tied", "phi"])
def test_quantizable_on_a_skeleton_is_what_4bit_loading_quantizes(kind, tmp_path):
    """Oracle: transformers + bitsandbytes themselves. Save a tiny model, load it with load_in_4bit and count the
    bitsandbytes Linear4bit layers (original shape from each layer's quant state) — the skeleton's prediction
    must match, tied head (Llama) and biased head (Phi) included."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PhiConfig

    small = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    config = PhiConfig(**small) if kind == "phi" else LlamaConfig(**small, tie_word_embeddings=kind == "llama-tied")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32))
    shapes = [m.weight.quant_state.shape for m in loaded.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert shapes and not isinstance(loaded.get_output_embeddings(), bnb.nn.Linear4bit)  # the head stays full
    assert arch.quantizable(arch.meta_model(config)) == (sum(r * c for r, c in shapes), sum(r for r, _ in shapes))


def test_groups_come_from_structure():
    """GPT-2's c_proj is attention *and* MLP (keys qualified by parent); OPT's fc1/fc2 sit directly in the block."""
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

    with torch.device("meta"):
        gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=32))
        opt = OPTForCausalLM(OPTConfig(hidden_size=16, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                       vocab_size=64, word_embed_proj_dim=8))
    roles = arch.count_params_by_role(gpt2)
    assert roles["attn.c_proj"] == 2 * (16 * 16 + 16) and roles["mlp.c_proj"] == 2 * (64 * 16 + 16)
    assert "c_proj" not in roles and sum(roles.values()) == sum(p.numel() for p in gpt2.parameters())
    groups = arch.group_roles(roles, gpt2)
    assert groups["attention"] == roles["c_attn"] + roles["attn.c_proj"] and groups["mlp"] == roles["c_fc"] + roles["mlp.c_proj"]
    roles = arch.count_params_by_role(opt)
    groups = arch.group_roles(roles, opt)
    assert groups["mlp"] == roles["fc1"] + roles["fc2"] == 2 * (16 * 64 + 64 + 64 * 16 + 16)
    assert groups["other"] == roles["project_in"] + roles["project_out"] == 2 * 16 * 8  # outside the blocks
    assert sum(groups.values()) == sum(p.numel() for p in opt.parameters())


def test_memory_by_precision_hand_computed():
    mem = arch.memory_by_precision(1_000_000)
    assert mem == {"fp32": 4_000_000, "bf16": 2_000_000, "int8": 1_000_000,
                   "nf4": 562_500,  # 4 bits + one fp32 absmax per 64 weights = 4.5 bits
                   "nf4+dq": 516_113.28125}  # 4 + 8/64 + 64/(64*256) bits
    assert arch.memory_by_precision(PHI2_PARAMS)["nf4"] == 1_563_572_160  # = 2_779_683_840 × 4.5 bits / 8
    assert arch.memory_by_precision(PHI2_PARAMS)["bf16"] == 2 * PHI2_PARAMS
    # only 640 of 1000 weights quantized, 10 output rows; the other 360 stay bf16 (2 bytes)
    part = arch.memory_by_precision(1000, quantized=640, rows=10)
    assert part["int8"] == 640 + 4 * 10 + 720
    assert part["nf4"] == 640 * 0.5625 + 720
    assert part["fp32"] == 4000
    assert arch.memory_by_precision(6400, blocksize=32)["nf4"] == 6400 * 5 / 8
