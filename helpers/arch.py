"""Architecture from real configs: shipped config.json files, meta-device skeletons, parameters by role, memory.

The configs in `data/configs/` are copies of the models' `config.json` on the Hugging Face hub (provenance in
`data/configs/README.md`). A skeleton built on the meta device has every parameter's shape but no storage, so
counting the parameters of Llama-2-70B takes milliseconds and no memory. Storage arithmetic (bits per weight of
each format) lives in `helpers.quant`; this module only applies it to parameter counts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from helpers import env, quant, roles

CONFIG_DIR = env.DATA_DIR / "configs"

# course name -> hub repository whose config.json the file in data/configs/ copies
HUB_IDS = {
    "phi-1": "microsoft/phi-1",
    "phi-1.5": "microsoft/phi-1_5",
    "phi-2": "microsoft/phi-2",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "phi-3-mini-4k-instruct": "microsoft/Phi-3-mini-4k-instruct",
    "gemma-3-270m-it": "google/gemma-3-270m-it",
    "gemma-3-1b-it": "google/gemma-3-1b-it",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen3-1.7b": "Qwen/Qwen3-1.7B",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B",
    "phi-4-mini-instruct": "microsoft/Phi-4-mini-instruct",
}

# len(tokenizer) of the hub tokenizers (checked facts, see data/configs/README.md); the embedding has more rows
TOKENIZER_LENGTH = {"phi-1.5": 50295, "phi-2": 50295}

# The precisions the course compares: label -> (format for helpers.quant, double quantization)
PRECISIONS = {
    "fp32": ("fp32", False),
    "bf16": ("bf16", False),
    "int8": ("int8", False),
    "nf4": ("nf4", False),
    "nf4+dq": ("nf4", True),
}

# Nominal memory of common GPUs, GiB (vendor data sheets; usable memory is slightly less)
GPU_MEMORY_GIB = {"T4 16 GB": 16, "L4 24 GB": 24, "A100 40 GB": 40, "A100 80 GB": 80}

# The coarse groups of `group_roles`, in display order
GROUPS = ("embedding", "attention", "mlp", "norms", "head", "other")


def config_names() -> list[str]:
    """Names of the configs shipped in data/configs/ (file stems), e.g. 'phi-2'."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def _config_path(name: str) -> Path:
    """The shipped JSON for a course name ('phi-1.5') or hub id ('microsoft/phi-1_5')."""
    by_hub = {hub.lower(): short for short, hub in HUB_IDS.items()}
    short = by_hub.get(name.lower(), name.lower())
    path = CONFIG_DIR / f"{short}.json"
    if not path.exists():
        raise FileNotFoundError(f"no shipped config {name!r}; available: {', '.join(config_names())}")
    return path


def load_config_dict(name: str) -> dict:
    """The raw config.json of a shipped model as a dict (exactly the file's contents)."""
    return json.loads(_config_path(name).read_text())


def load_config(name: str):
    """A transformers config (PhiConfig, LlamaConfig, MistralConfig, …) from the shipped JSON; no download.

    `auto_map` (old remote-code entry points) is dropped: the course builds the native transformers class.
    """
    from transformers import AutoConfig

    raw = load_config_dict(name)
    raw.pop("auto_map", None)
    return AutoConfig.for_model(raw.pop("model_type"), **raw)


def meta_model(config):
    """A causal-LM skeleton of `config` on the meta device: every parameter shape, no storage, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _linear_keys(model) -> dict[str, tuple[str, str]]:
    """Full name -> (key, group) of each linear layer: the key is its leaf name, parent-qualified ("attn.c_proj")
    when the same leaf name sits in two groups (GPT-2's c_proj); the group is attention, mlp or other (helpers.roles).
    """
    groups = {name: roles.GROUP_OF[role] for name, role in roles.linear_roles(model).items()}
    by_leaf: dict[str, set[str]] = {}
    for name, group in groups.items():
        by_leaf.setdefault(name.rsplit(".", 1)[-1], set()).add(group)
    keys = {}
    for name, group in groups.items():
        leaf = name.rsplit(".", 1)[-1]
        keys[name] = (leaf if len(by_leaf[leaf]) == 1 else ".".join(name.split(".")[-2:]), group)
    return keys


def count_params_by_role(model) -> dict[str, int]:
    """Parameter count per role: 'embedding', each Linear leaf name (q_proj, …, fc2), 'norm', 'head', 'other'.

    Roles come from `helpers.roles.module_kind`; a linear layer is keyed by its leaf name (parent-qualified when
    ambiguous, see `_linear_keys`). Each parameter is counted once (a head tied to the embedding adds nothing);
    biases count with their layer. The values sum to `sum(p.numel() for p in model.parameters())`.
    """
    head, embedding = roles.head_module(model), roles.embedding_module(model)
    keys = _linear_keys(model)
    seen: set[int] = set()
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        if not own:
            continue
        seen.update(id(p) for p in own)
        role = roles.module_kind(module, head, embedding)
        if role == "linear":
            role = keys[name][0] if name in keys else name.rsplit(".", 1)[-1]
        counts[role] = counts.get(role, 0) + sum(p.numel() for p in own)
    return counts


def group_roles(counts: Mapping[str, int], model) -> dict[str, int]:
    """Coarse groups of `count_params_by_role(model)`: embedding, attention, mlp, norms, head, other.

    A linear layer's group (attention or mlp) comes from the model's structure (`helpers.roles.linear_roles`),
    so `model` must be the one the counts were taken from.
    """
    group_of = {key: group for key, group in _linear_keys(model).values()}
    group_of.update({"embedding": "embedding", "head": "head", "norm": "norms"})
    out = dict.fromkeys(GROUPS, 0)
    for role, n in counts.items():
        out[group_of.get(role, "other")] += n
    return out


def shape_summary(config, model=None) -> dict[str, int | float]:
    """Layers, hidden size, heads, KV heads, head dim, rotary dims, MLP width and vocab rows of a config.

    Rotary dims are read from the built skeleton's inverse-frequency buffer when `model` is given (two dims
    per frequency), else from the config's partial rotary factor.
    """
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
    rotary = int(head_dim * factor)
    if model is not None:
        inv = dict(model.named_buffers()).get("model.rotary_emb.inv_freq")
        if inv is not None:
            rotary = 2 * inv.shape[-1]
    return {
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "heads": heads,
        "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
        "rotary_dims": rotary,
        "partial_rotary_factor": rotary / head_dim,
        "intermediate_size": config.intermediate_size,
        "vocab_rows": config.vocab_size,
        "max_positions": config.max_position_embeddings,
    }


def find_configs(names: Iterable[str] | None = None, **shape) -> list[str]:
    """Shipped configs whose `shape_summary` matches every given field, e.g. find_configs(layers=24, head_dim=64)."""
    hits = []
    for name in names or config_names():
        summary = shape_summary(load_config(name))
        unknown = set(shape) - set(summary)
        if unknown:
            raise KeyError(f"unknown shape fields {sorted(unknown)}; use {sorted(summary)}")
        if all(summary[k] == v for k, v in shape.items()):
            hits.append(name)
    return hits


def quantizable(model) -> tuple[int, int]:
    """(weights, output rows) of the Linear layers bitsandbytes would quantize (`helpers.quant.quantizable_linears`)."""
    layers = quant.quantizable_linears(model)
    return sum(n for _, n, _ in layers), sum(r for _, _, r in layers)


def memory_by_precision(
    n_params: int,
    precisions: Mapping[str, tuple[str, bool]] = PRECISIONS,
    blocksize: int = 64,
    rows: int = 0,
    quantized: int | None = None,
    keep: str = "bf16",
) -> dict[str, float]:
    """Bytes to store `n_params` weights in each precision (label -> bytes), via helpers.quant.weight_bytes.

    By default every weight is stored in the format (the simple arithmetic for published parameter counts).
    With `quantized` set, only that many weights (the Linear layers, see `quantizable`) take the 8/4-bit
    formats and the rest (embedding, head, norms, biases) stays in `keep`, as bitsandbytes does; `rows` adds
    int8's one fp32 scale per output row.
    """
    return {label: quant.weight_bytes(n_params, fmt, blocksize, dq, rows=rows, quantized=quantized, keep=keep)
            for label, (fmt, dq) in precisions.items()}
