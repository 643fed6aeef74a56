"""The shipped config.json files (data/configs/): each builds a meta skeleton whose size matches the published one.

Oracles are independent of the code under test: the sizes the model authors published (model cards, papers) and
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
}
LICENCES = ("Apache-2.0", "MIT", "Llama 2 Community License", "Llama 3.2 Community License")


def published_count(label: str) -> tuple[float, float]:
    """'1.23B' -> (1.23e9, 0.01e9): the value and one unit of its last digit."""
    digits, scale = label[:-1], {"M": 1e6, "B": 1e9}[label[-1]]
    decimals = len(digits.split(".")[1]) if "." in digits else 0
    return float(digits) * scale, scale / 10**decimals


def llama_style_params(c: dict) -> int:
    """Closed form for a Llama-style decoder without biases except Qwen2's q/k/v biases; tied head counted once."""
    hidden, layers, ff, vocab = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    head_dim = c.get("head_dim") or hidden // heads
    qkv_bias = (heads + 2 * kv) * head_dim if c["model_type"] == "qwen2" else 0
    attn = hidden * heads * head_dim + 2 * hidden * kv * head_dim + heads * head_dim * hidden + qkv_bias
    block = attn + 3 * hidden * ff + 2 * hidden
    head = 0 if c.get("tie_word_embeddings", True) else vocab * hidden
    return vocab * hidden + layers * block + hidden + head


@pytest.fixture(scope="module")
def totals():
    return {n: sum(p.numel() for p in arch.meta_model(arch.load_config(n)).parameters()) for n in PUBLISHED}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_skeleton_matches_published_size(totals, name):
    value, unit = published_count(PUBLISHED[name][0])
    assert abs(totals[name] - value) < unit, (name, totals[name], PUBLISHED[name])


@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-0.5b", "llama-3.2-1b", "phi-3-mini-4k-instruct"])
def test_skeleton_equals_closed_form(totals, name):
    # Phi-3 fuses q/k/v and gate/up into single matrices: the same weights, so the same closed form
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
