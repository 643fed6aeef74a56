"""helpers.lora on tiny models of six architectures built from config (no downloads)."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from torch import nn

from helpers import lora

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256)
LAYERS = 2


def build(arch: str) -> nn.Module:
    """A tiny random causal LM of `arch`, seeded."""
    import transformers as tf

    tf.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    if arch == "phi":
        return tf.PhiForCausalLM(tf.PhiConfig(**SMALL, partial_rotary_factor=0.4))
    if arch == "llama":  # SmolLM2's family: GQA, tied embeddings
        return tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=True))
    if arch == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**SMALL, num_key_value_heads=2))
    if arch == "gemma":
        return tf.GemmaForCausalLM(tf.GemmaConfig(**SMALL, num_key_value_heads=1, head_dim=16))
    if arch == "phi3":
        return tf.Phi3ForCausalLM(tf.Phi3Config(**SMALL, pad_token_id=0))
    if arch == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=LAYERS, n_head=4, vocab_size=256, n_positions=64))
    raise ValueError(arch)


LLAMA_LIKE = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    "all-linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qv": ["q_proj", "v_proj"],
}
EXPECTED = {
    "phi": {
        "attention": ["q_proj", "k_proj", "v_proj", "dense"],
        "mlp": ["fc1", "fc2"],
        "all-linear": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
        "qv": ["q_proj", "v_proj"],
    },
    "llama": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "gemma": LLAMA_LIKE,
    "phi3": {
        "attention": ["qkv_proj", "o_proj"],
        "mlp": ["gate_up_proj", "down_proj"],
        "all-linear": ["o_proj", "qkv_proj", "gate_up_proj", "down_proj"],  # Phi3Attention registers o_proj first
        "qv": ["qkv_proj"],
    },
    "gpt2": {  # c_proj is both the attention output and the MLP's second layer: presets qualify it
        "attention": ["c_attn", "attn.c_proj"],
        "mlp": ["c_fc", "mlp.c_proj"],
        "all-linear": ["c_attn", "c_proj", "c_fc"],
        "qv": ["c_attn"],
    },
}
ARCHS = list(EXPECTED)
# layers each preset adapts per decoder layer (GPT-2's all-linear "c_proj" hits two layers)
PER_LAYER = {arch: {k: len(v) for k, v in EXPECTED[arch].items()} for arch in ARCHS}
PER_LAYER["gpt2"]["all-linear"] = 4


def peft_model(model: nn.Module, targets, r: int = 4):
    from peft import LoraConfig, get_peft_model

    fan = any(type(m).__name__ == "Conv1D" for m in model.modules())
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets,
                                            task_type="CAUSAL_LM", fan_in_fan_out=fan))


def batch(seed: int = 0, n: int = 2, length: int = 12) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (n, length), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


# ------------------------------------------------------------------------------------------ discovery
@pytest.mark.parametrize("arch", ARCHS)
def test_linear_module_names_and_presets(arch):
    model = build(arch)
    assert lora.linear_module_names(model) == EXPECTED[arch]["all-linear"]
    assert "lm_head" not in lora.linear_module_names(model)
    assert lora.target_presets(model) == EXPECTED[arch]


@pytest.mark.parametrize("arch", ARCHS)
def test_leaves_by_role(arch):
    model = build(arch)
    roles = lora.leaves_by_role(model)
    assert roles["head"] == ["lm_head"]
    assert roles["embedding"] == (["transformer.wte"] if arch == "gpt2" else ["model.embed_tokens"])
    assert roles["other"] == []
    out_leaf = {"phi": "dense", "gpt2": "c_proj"}.get(arch, "o_proj")
    assert [n.rsplit(".", 1)[-1] for n in roles["attention_out"]] == [out_leaf] * LAYERS
    n_linear = sum(len(roles[k]) for k in ("attention_in", "attention_out", "mlp"))
    assert n_linear == LAYERS * PER_LAYER[arch]["all-linear"]


def test_bitsandbytes_layers_are_linear_like():
    bnb = pytest.importorskip("bitsandbytes")

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = nn.Module()
            self.self_attn.q4 = bnb.nn.Linear4bit(8, 8)
            self.self_attn.k8 = bnb.nn.Linear8bitLt(8, 8, has_fp16_weights=False)
            self.mlp = nn.Module()
            self.mlp.fc = nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)
            self.lm_head = nn.Linear(8, 16)

        def get_output_embeddings(self):
            return self.lm_head

    assert lora.linear_module_names(Block()) == ["q4", "k8", "fc"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_discovery_inside_a_peft_model(arch):
    """LoRA wrappers and modules_to_save copies count as the layer they wrap; nothing inside them leaks out."""
    model = build(arch)
    before = (lora.linear_module_names(model), lora.target_presets(model))
    head, emb = ("lm_head", "wte") if arch == "gpt2" else ("lm_head", "embed_tokens")
    pm = peft_model(model, EXPECTED[arch]["qv"]) if arch == "gpt2" else None
    if pm is None:
        from peft import LoraConfig, get_peft_model

        pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=[head, emb],
                                              task_type="CAUSAL_LM"))
    assert (lora.linear_module_names(pm), lora.target_presets(pm)) == before
    roles = lora.leaves_by_role(pm)
    assert roles["head"] == ["base_model.model.lm_head"] and roles["embedding"][0].endswith("." + emb)
    assert lora.lora_summary(pm)["adapted_layers"] == LAYERS


def test_meta_device_phi2_skeleton():
    from transformers import PhiConfig

    from helpers import arch

    cfg = PhiConfig(hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32,
                    vocab_size=51200, partial_rotary_factor=0.4)
    model = arch.meta_model(cfg)
    assert lora.target_presets(model) == EXPECTED["phi"]
    # r * (in + out) per layer: q,k,v,dense 2560+2560; fc1/fc2 2560+10240; x 32 layers, r = 8
    assert lora.expected_lora_params(model, "all-linear", 8) == 8 * 32 * (4 * 5120 + 2 * 12800) == 11_796_480
    assert lora.expected_lora_params(model, ["lm_head"], 8) == 8 * (2560 + 51200)


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("arch", ARCHS)
def test_every_preset_validates(arch):
    model = build(arch)
    for name, targets in lora.target_presets(model).items():
        assert lora.validate_targets(model, targets) == targets, name
    assert lora.validate_targets(model, "all-linear") == EXPECTED[arch]["all-linear"]


def test_seed_targets_raise_with_modern_names():
    model = build("phi")
    with pytest.raises(ValueError) as err:
        lora.validate_targets(model, ["lm_head.linear", "transformer.embd.wte"])
    msg = str(err.value)
    assert "'lm_head.linear'" in msg and "'transformer.embd.wte'" in msg
    assert "use 'lm_head'" in msg and "use 'model.embed_tokens'" in msg
    assert "modules_to_save" in msg and "refuse to build" in msg
    assert "['q_proj', 'k_proj', 'v_proj', 'dense', 'fc1', 'fc2']" in msg  # the available names


def test_mixed_stale_and_valid_names():
    model = build("phi")
    with pytest.raises(ValueError) as err:
        lora.validate_targets(model, ["Wqkv", "out_proj", "fc1", "fc2"])
    msg = str(err.value)
    assert "2 of 4" in msg and "['Wqkv', 'out_proj']" in msg and "silently" in msg
    assert "'q_proj', 'k_proj', 'v_proj'" in msg and "use 'dense'" in msg
    # the same list on a Llama-family model suggests that model's own names
    with pytest.raises(ValueError) as err:
        lora.validate_targets(build("llama"), ["Wqkv", "out_proj", "fc1"])
    msg = str(err.value)
    assert "use 'o_proj'" in msg and "'gate_proj', 'up_proj', 'down_proj'" in msg
    with pytest.raises(ValueError, match="did you mean 'q_proj'"):
        lora.validate_targets(model, ["q_prj"])


def test_validate_regex_and_head_warning():
    model = build("phi")
    assert lora.validate_targets(model, r".*\.0\.mlp\.fc[12]") == ["model.layers.0.mlp.fc1", "model.layers.0.mlp.fc2"]
    with pytest.raises(ValueError, match="regex"):
        lora.validate_targets(model, r"transformer\..*")
    with pytest.warns(UserWarning, match="modules_to_save"):
        assert lora.validate_targets(model, ["lm_head", "embed_tokens"]) == ["lm_head", "embed_tokens"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora.validate_targets(model, ["q_proj"])  # no warning for ordinary targets


def test_matching_agrees_with_peft():
    """matched_modules() reproduces peft's suffix rule on random target lists (what peft actually wraps)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    rng = random.Random(0)
    pool = ["q_proj", "k_proj", "dense", "fc1", "fc2", "mlp.fc1", "0.mlp.fc2", "self_attn.v_proj", "lm_head",
            "embed_tokens", "proj", "_proj", "layers.1.self_attn.q_proj"]
    cases = [rng.sample(pool, 3) for _ in range(8)] + [["proj", "_proj"]]  # the last: suffixes of names, not names
    for targets in cases:  # every case is compared: when nothing matches, peft must refuse to build
        model = build("phi")
        try:
            pm = peft_model(model, targets)
        except ValueError as err:  # peft's NoMatchingPeftModuleError
            assert "not found" in str(err), err
            wrapped = []
        else:
            wrapped = [n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, BaseTunerLayer)]
        assert lora.matched_modules(build("phi"), targets) == wrapped, targets


# ------------------------------------------------------------------------------------------ summary
@pytest.mark.parametrize("arch", ARCHS)
def test_summary_matches_closed_form(arch):
    for name, targets in EXPECTED[arch].items():
        model = build(arch)
        expected = lora.expected_lora_params(model, targets, r=4)
        summary = lora.lora_summary(peft_model(model, targets, r=4))
        assert summary["trainable_params"] == summary["lora_params"] == expected, name
        assert summary["adapted_layers"] == LAYERS * PER_LAYER[arch][name], name
        assert summary["n_lora_tensors"] == 2 * summary["adapted_layers"]
        assert 0 < summary["trainable_fraction"] < 0.2


def test_summary_numbers_llama():
    model = build("llama")
    summary = lora.lora_summary(peft_model(model, ["q_proj", "v_proj"], r=4))
    # q: 64->64, v: 64->32 (2 of 4 kv heads): r*(64+64) + r*(64+32) = 512 + 384 per layer, 2 layers
    assert summary["trainable_params"] == 2 * (4 * 128 + 4 * 96) == 1792
    assert summary["adapted_per_target"] == {"q_proj": 2, "v_proj": 2}


def test_embedding_and_head_lora():
    model = build("llama")
    targets = ["embed_tokens", "lm_head"]
    expected = lora.expected_lora_params(model, targets, r=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = lora.lora_summary(peft_model(model, targets, r=4))
    assert expected == 2 * 4 * (256 + 64) == summary["trainable_params"]
    assert summary["adapted_per_target"] == {"embed_tokens": 1, "lm_head": 1}


def test_peft_default_for_phi_omits_k_proj_and_dense():
    from peft import LoraConfig, get_peft_model
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    model = build("phi")
    assert set(lora.linear_module_names(model)) - set(DEFAULTS["phi"]) == {"k_proj", "dense"}
    pm = get_peft_model(model, LoraConfig(r=4, task_type="CAUSAL_LM"))
    assert set(lora.lora_summary(pm)["adapted_per_target"]) == {"q_proj", "v_proj", "fc1", "fc2"}


# ------------------------------------------------------------------------------------------ gradients
@pytest.mark.slow
def test_gradients_fresh_and_after_a_step():
    pm = peft_model(build("llama"), "all-linear")
    report = lora.check_lora_gradients(pm, batch())
    assert report["n_tensors"] == 28 and report["zero"] == []
    # lora_B starts at zero, so every lora_A gradient is exactly zero before the first step
    assert report["n_nonzero"] == 14 and all(".lora_A." in n for n in report["zero_expected"])
    assert all(p.grad is None for p in pm.parameters())  # zeroed afterwards
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm(**batch()).loss.backward()
    opt.step()
    opt.zero_grad()
    report = lora.check_lora_gradients(pm, batch(1))
    assert report["n_nonzero"] == 28 and report["zero"] == report["zero_expected"] == []


def test_gradients_raise_on_blocked_path_and_non_peft_model():
    pm = peft_model(build("llama"), "all-linear")
    layer0 = pm.base_model.model.model.layers[0]
    layer0.register_forward_hook(lambda m, i, o: o.detach() if torch.is_tensor(o) else (o[0].detach(), *o[1:]))
    with pytest.raises(RuntimeError, match="7 of 28 LoRA tensors received no gradient") as err:
        lora.check_lora_gradients(pm, batch())
    assert "layers.0." in str(err.value) and "layers.1." not in str(err.value)
    with pytest.raises(RuntimeError, match="no trainable LoRA tensors"):
        lora.check_lora_gradients(build("llama"), batch())


def test_gradients_catch_bitsandbytes_cpu_eval_bug(tmp_path):
    """docs/sources.md#bnb-cpu-repack: a no-grad eval-mode forward of a 4-bit model on CPU repacks it; backward stops flowing."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    build("llama").save_pretrained(tmp_path)
    q = AutoModelForCausalLM.from_pretrained(
        tmp_path, device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32),
    )
    assert lora.linear_module_names(q) == LLAMA_LIKE["all-linear"]  # Linear4bit layers are found
    pm = peft_model(q, "all-linear")
    assert lora.check_lora_gradients(pm, batch())["zero"] == []
    pm.eval()
    with torch.no_grad():
        pm(**batch())
    from bitsandbytes.functional import has_avx512bf16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if has_avx512bf16():  # the repack exists only for bitsandbytes' AVX-512 BF16 CPU kernel
            with pytest.raises(RuntimeError, match="bitsandbytes CPU bug.*train\\(\\) mode"):
                lora.check_lora_gradients(pm, batch())
        else:  # no such kernel here (e.g. AMD Zen 3): nothing is repacked and every LoRA tensor still learns
            assert lora.check_lora_gradients(pm, batch())["zero"] == []


@pytest.mark.slow
def test_lora_training_lowers_loss():
    pm = peft_model(build("llama"), "all-linear", r=8)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    b = batch(0, n=4, length=16)
    losses = []
    for _ in range(15):
        loss = pm(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
