"""helpers.roles: the structural role of every layer, across the decoders transformers ships (meta-device skeletons)."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from helpers import arch, lora, roles

H = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256)
G2 = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)
MOE = dict(moe_intermediate_size=32, num_experts_per_tok=2)
# model_type -> tiny config kwargs (2 decoder layers each)
CONFIGS = {
    "llama": dict(H, num_key_value_heads=2),
    "mistral": dict(H, num_key_value_heads=2),
    "qwen2": dict(H, num_key_value_heads=2),
    "qwen3": dict(H, num_key_value_heads=2, head_dim=16),
    "phi": dict(H, partial_rotary_factor=0.4),
    "phi3": dict(H, pad_token_id=0),
    "gemma": dict(H, num_key_value_heads=1, head_dim=16),
    "gemma2": dict(H, num_key_value_heads=1, head_dim=16),
    "gemma3_text": dict(H, num_key_value_heads=1, head_dim=16),
    "starcoder2": dict(H, num_key_value_heads=2),
    "olmo": dict(H),
    "olmo2": dict(H),
    "stablelm": dict(H),
    "granite": dict(H),
    "cohere": dict(H),
    "persimmon": dict(H),
    "smollm3": dict(H, num_key_value_heads=2, pad_token_id=0),
    "deepseek_v3": dict(H, **MOE, n_routed_experts=4, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1),
    "mixtral": dict(H, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(H, **MOE, shared_expert_intermediate_size=64, num_experts=4),
    "qwen3_moe": dict(H, **MOE, num_experts=4, head_dim=16),
    "llama4_text": dict(H, intermediate_size_mlp=128, num_local_experts=4, head_dim=16),
    "gpt2": dict(G2),
    "gpt_bigcode": dict(G2),
    "gptj": dict(G2, rotary_dim=8),
    "codegen": dict(G2, rotary_dim=8, n_ctx=64),
    "gpt_neox": dict(H),
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=256),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=256),
    "mpt": dict(d_model=64, n_layers=2, n_heads=4, vocab_size=256, expansion_ratio=2),
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
                word_embed_proj_dim=32),  # fc1/fc2 are direct children of the block; project_in/out outside it
    "xglm": dict(d_model=64, ffn_dim=128, num_layers=2, attention_heads=4, vocab_size=256),
    "biogpt": dict(H),
}
# The attention output projection's leaf name (the last projection the attention forward() calls)
OUT_LEAF = {"phi": "dense", "persimmon": "dense", "gpt_neox": "dense", "falcon": "dense", "bloom": "dense",
            "gpt2": "c_proj", "gpt_bigcode": "c_proj", "gptj": "out_proj", "codegen": "out_proj", "mpt": "out_proj",
            "opt": "out_proj", "xglm": "out_proj", "biogpt": "out_proj"}
# MoE models whose experts are fused 3-D parameters (transformers 5), not Linear layers: no adaptable MLP layer
FUSED_EXPERTS = {"mixtral", "qwen3_moe"}


@functools.cache
def build(model_type: str) -> nn.Module:
    """A tiny skeleton of `model_type` on the meta device (shapes only, no storage)."""
    import transformers as tf
    from transformers import AutoConfig, AutoModelForCausalLM

    tf.utils.logging.set_verbosity_error()
    try:
        config = AutoConfig.for_model(model_type, **CONFIGS[model_type])
    except ValueError:
        pytest.skip(f"{model_type} is not in the installed transformers")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def layer_list(model: nn.Module) -> str:
    """The decoder's ModuleList of layers, found independently of helpers.roles (by its conventional name)."""
    return next(n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n.rsplit(".", 1)[-1]
                in ("layers", "h", "blocks"))


def adaptable(model: nn.Module) -> list[str]:
    """Every nn.Linear / Conv1D but the output head, by full name (what peft's all-linear adapts)."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and m is not head]


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_attention_and_mlp_split_every_block_layer(model_type):
    model = build(model_type)
    layers = layer_list(model)
    in_blocks = [n for n in adaptable(model) if n.startswith(layers + ".")]
    by_role = roles.leaves_by_role(model)
    classified = by_role["attention_in"] + by_role["attention_out"] + by_role["mlp"]
    assert sorted(classified) == sorted(in_blocks)
    assert sorted(by_role["other"]) == sorted(n for n in adaptable(model) if n not in in_blocks)
    assert roles.decoder_blocks(model) == [f"{layers}.{i}" for i in range(2)]
    # one output projection per block, the last one attention's forward() calls
    out_leaf = OUT_LEAF.get(model_type, "o_proj")
    assert [n.rsplit(".", 1)[-1] for n in by_role["attention_out"]] == [out_leaf] * 2
    assert by_role["attention_in"] and by_role["head"] and by_role["embedding"]
    if model_type in FUSED_EXPERTS:
        assert by_role["mlp"] == [] and any(p.dim() == 3 for n, p in model.named_parameters() if "experts" in n)
    else:
        assert by_role["mlp"]


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_presets_match_exactly_their_roles(model_type):
    model = build(model_type)
    by_role = roles.leaves_by_role(model)
    presets = lora.target_presets(model)
    attention = by_role["attention_in"] + by_role["attention_out"]
    assert sorted(lora.matched_modules(model, presets["attention"])) == sorted(attention)
    assert sorted(lora.matched_modules(model, presets["mlp"])) == sorted(by_role["mlp"])
    assert lora.matched_modules(model, presets["all-linear"]) == adaptable(model)
    assert presets["qv"] and set(lora.matched_modules(model, presets["qv"])) <= set(by_role["attention_in"])
    assert presets["attention"] and (bool(presets["mlp"]) != (model_type in FUSED_EXPERTS))
    # the coarse parameter groups agree with the layer roles
    groups = arch.group_roles(arch.count_params_by_role(model), model)
    assert sum(groups.values()) == sum(p.numel() for p in model.parameters())
    modules = dict(model.named_modules())
    assert groups["attention"] == sum(p.numel() for n in attention for p in modules[n].parameters())


# ------------------------------------------------------------------------------ a hand-built decoder
class Attention(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        weights = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), dim=-1)
        return self.o(weights @ self.v(x))


class Block(nn.Module):
    """A decoder block whose feed-forward Linears are its direct children (no mlp submodule)."""

    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.self_attn = Attention(d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.self_attn(self.norm(x))
        return x + self.down(torch.relu(self.up(x)))


class TinyDecoder(nn.Module):
    def __init__(self, d: int = 8, vocab: int = 32, n_layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def test_ffn_linears_directly_in_the_block_are_mlp():
    model = TinyDecoder()
    by_role = roles.leaves_by_role(model)
    assert by_role["mlp"] == ["layers.0.up", "layers.0.down", "layers.1.up", "layers.1.down"]
    assert by_role["other"] == []
    assert by_role["attention_out"] == ["layers.0.self_attn.o", "layers.1.self_attn.o"]
    assert by_role["embedding"] == ["embed"] and by_role["head"] == ["lm_head"]
    presets = lora.target_presets(model)
    assert presets["mlp"] == ["up", "down"] and presets["attention"] == ["q", "k", "v", "o"] and presets["qv"] == ["q", "v"]
    groups = arch.group_roles(arch.count_params_by_role(model), model)
    assert groups["mlp"] == 2 * (8 * 32 + 32 + 32 * 8 + 8) and groups["other"] == 0
    model(torch.tensor([[1, 2, 3]]))  # a working module, not just a tree


def test_peft_wrapped_decoder_keeps_its_roles():
    from peft import LoraConfig, get_peft_model

    model = TinyDecoder()
    before = roles.leaves_by_role(model)
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["q", "up"]))
    after = roles.leaves_by_role(pm)
    assert {k: [n.removeprefix("base_model.model.") for n in v] for k, v in after.items()} == before


def test_no_module_list_falls_back_to_the_attention_parent():
    model = nn.Module()
    model.self_attn = Attention(8)
    model.up = nn.Linear(8, 8)
    assert roles.decoder_blocks(model) == [""]
    assert roles.linear_roles(model) == {"self_attn.q": "attention_in", "self_attn.k": "attention_in",
                                         "self_attn.v": "attention_in", "self_attn.o": "attention_out", "up": "mlp"}


def test_call_order_warns_when_forward_cannot_be_read():
    """Phi-3 registers o_proj before qkv_proj: where forward()'s source is unreadable the registration order is all
    there is, and the helper says so instead of silently taking qkv_proj as the output projection."""
    import warnings

    def attention_class(source: str | None) -> type:
        class Attn(nn.Module):
            def __init__(self):
                super().__init__()
                self.o_proj, self.qkv_proj = nn.Linear(8, 8), nn.Linear(8, 24)  # Phi-3's registration order

            def forward(self, x):
                return self.o_proj(self.qkv_proj(x)[..., :8])

        if source is not None:  # a forward compiled from a string: inspect.getsource raises OSError for it
            scope: dict = {}
            exec(source, scope)
            Attn.forward = scope["forward"]
        return Attn

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a readable forward: the call order, and no warning
        assert roles.call_order(attention_class(None)(), ["o_proj", "qkv_proj"]) == ["qkv_proj", "o_proj"]
    unreadable = attention_class("def forward(self, x):\n    return self.o_proj(self.qkv_proj(x)[..., :8])\n")()
    with pytest.warns(UserWarning, match="registration order"):
        assert roles.call_order(unreadable, ["o_proj", "qkv_proj"]) == ["o_proj", "qkv_proj"]


def test_module_and_param_kinds():
    model = build("phi")  # biased Linears, LayerNorms, a biased head
    head, emb = roles.head_module(model), roles.embedding_module(model)
    layer = model.model.layers[0]
    assert roles.module_kind(model.lm_head, head, emb) == "head" == roles.param_kind(model.lm_head, "bias", head, emb)
    assert roles.module_kind(model.model.embed_tokens, head, emb) == "embedding"
    assert roles.module_kind(layer.input_layernorm, head, emb) == "norm"
    assert roles.param_kind(layer.input_layernorm, "bias", head, emb) == "norm"
    assert roles.module_kind(layer.mlp.fc1, head, emb) == "linear"
    assert roles.param_kind(layer.mlp.fc1, "bias", head, emb) == "bias"
    assert roles.module_kind(layer, head, emb) == "other"

