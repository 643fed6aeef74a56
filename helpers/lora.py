"""LoRA target modules: find adaptable layers, group them by role, validate targets, summarise, check gradients.

Which role a layer plays (attention in/out, MLP, other, embedding, head) comes from `helpers.roles`, which reads
it from the model's structure (the decoder blocks, their attention module, the order its forward() calls its
projections), not from a table of known names, so it works for Phi, Llama-family (SmolLM2, Qwen2), Gemma, Phi-3
(fused ``qkv_proj``/``gate_up_proj``), GPT-2 (``Conv1D``), OPT (feed-forward layers directly in the block) and
the rest of transformers' decoders. Name tables appear only to *suggest* replacements for stale names in errors.
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Iterable, Mapping

from torch import nn

from helpers import quant, roles

ALL_LINEAR = "all-linear"

# The query and value in-projections of the q+v preset, by leaf name (a fused qkv projection matches neither).
_QUERY_RE = re.compile(r"(^|[_.])(q|query)([_.]|$)|^q_?proj$|^query", re.IGNORECASE)
_VALUE_RE = re.compile(r"(^|[_.])(v|value)([_.]|$)|^v_?proj$|^value", re.IGNORECASE)

# Old names that went stale when models moved into transformers (Phi-2's Dec-2023 remote code: peft #1375,
# docs/sources.md#phi-names): stale target -> the role whose names on *this* model replace it. Used only for error hints.
_STALE = {
    "Wqkv": "attention_in",
    "out_proj": "attention_out",
    "lm_head.linear": "head",
    "transformer.embd.wte": "embedding",
    "embd.wte": "embedding",
}
# Names other architectures use, by role, so a target copied from another model gets a hint in this
# model's own names (e.g. fc1 on Llama -> gate_proj, up_proj, down_proj). Used only for error hints.
_OTHER_ARCH = {
    **dict.fromkeys(["q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "query_key_value", "query", "key",
                     "value", "Wqkv", "q", "k", "v"], "attention_in"),
    **dict.fromkeys(["o_proj", "dense", "out_proj", "o"], "attention_out"),
    **dict.fromkeys(["fc1", "fc2", "gate_proj", "up_proj", "down_proj", "gate_up_proj", "c_fc", "w1", "w2", "w3",
                     "dense_h_to_4h", "dense_4h_to_h", "wi", "wo"], "mlp"),
}
_HEAD_ADVICE = (
    "the output head and the embedding are not what LoRA adapts: target the attention/MLP projections; "
    "if you add tokens, train the embedding/head fully with LoraConfig(modules_to_save=[...])"
)


# ---------------------------------------------------------------------------------------------- discovery
def linear_module_names(model: nn.Module) -> list[str]:
    """Leaf names (deduplicated, model order) of every Linear / 4-bit / 8-bit / Conv1D layer except the output head."""
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name, _ in roles.linear_layers(model)))


def leaves_by_role(model: nn.Module) -> dict[str, list[str]]:
    """Full module names grouped by role: attention_in, attention_out, mlp, other (linear) + embedding, head.

    The rule lives in `helpers.roles.leaves_by_role`: attention is the decoder block's attention module (its output
    projection is the last one its forward() calls); every other linear layer of a block is MLP.
    """
    return roles.leaves_by_role(model)


def _target_names(full_names: list[str], others: Iterable[str]) -> list[str]:
    """Shortest dotted suffixes that pick exactly `full_names` (peft suffix semantics), avoiding `others`.

    The leaf name is used when it is unambiguous; e.g. GPT-2's c_proj is in attention *and* MLP, so the
    attention preset says "attn.c_proj" and the MLP preset "mlp.c_proj".
    """
    others = list(others)
    out = []
    for full in full_names:
        parts = full.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not any(_matches(suffix, o) for o in others):
                break
        out.append(suffix)
    return list(dict.fromkeys(out))


def target_presets(model: nn.Module) -> dict[str, list[str]]:
    """Target lists by role for this model: "attention" (in-projections + output), "mlp", "all-linear", "qv"."""
    by_role = leaves_by_role(model)
    every = [n for k in ("attention_in", "attention_out", "mlp", "other") for n in by_role[k]]
    every += by_role["embedding"] + by_role["head"]
    attention = by_role["attention_in"] + by_role["attention_out"]
    mlp = by_role["mlp"]
    presets = {
        "attention": _target_names(attention, [n for n in every if n not in attention]),
        "mlp": _target_names(mlp, [n for n in every if n not in mlp]),
        "all-linear": linear_module_names(model),
    }
    # q+v (LoRA paper / peft default style): the query and value in-projections; a fused qkv projection as is.
    ins = _target_names(by_role["attention_in"], [n for n in every if n not in by_role["attention_in"]])
    q = [t for t in ins if _QUERY_RE.search(t.rsplit(".", 1)[-1])]
    v = [t for t in ins if _VALUE_RE.search(t.rsplit(".", 1)[-1])]
    if q and v:
        presets["qv"] = q + [t for t in v if t not in q]
    elif len(ins) == 3:  # separate projections, unusual names: forward() computes query, key, value in that order
        first = next(iter(roles.attention_projections(model).values()))
        order = [n for n in first if n in by_role["attention_in"]]
        presets["qv"] = _target_names([order[0], order[2]], [n for n in every if n not in by_role["attention_in"]])
    else:  # fused in-projection (Phi-3 qkv_proj, GPT-2 c_attn): adapting it adapts q, k and v together
        presets["qv"] = ins
    return presets


# ---------------------------------------------------------------------------------------------- validation
def _matches(target: str, key: str) -> bool:
    """peft's rule for a target in a list: the full module name equals it or ends with "." + target."""
    return key == target or key.endswith("." + target)


def _modern_names(model: nn.Module, role: str) -> list[str]:
    by_role = leaves_by_role(model)
    if role in ("embedding", "head"):
        return by_role[role]
    presets = target_presets(model)
    if role == "attention_in":
        return [t for t in presets["attention"] if any(_matches(t, n) for n in by_role["attention_in"])]
    if role == "attention_out":
        return [t for t in presets["attention"] if any(_matches(t, n) for n in by_role["attention_out"])]
    return presets.get(role, [])


def suggest(model: nn.Module, target: str, available: Iterable[str] | None = None) -> str:
    """A hint for a target that matches nothing: its modern name on this model, or the closest leaf names."""
    available = list(available if available is not None else linear_module_names(model))
    role = _STALE.get(target) or _STALE.get(target.rsplit(".", 1)[-1])
    if role:
        names = _modern_names(model, role)
        hint = f"{target!r} is an old (remote-code) name; on this model use {', '.join(map(repr, names)) or '(none found)'}"
        if role in ("embedding", "head"):
            hint += f" ({_HEAD_ADVICE})"
        return hint
    leaf = target.rsplit(".", 1)[-1]
    if leaf in _OTHER_ARCH:
        role = _OTHER_ARCH[leaf]
        names = _modern_names(model, role)
        what = {"attention_in": "attention in-projections", "attention_out": "attention output", "mlp": "MLP"}[role]
        return f"{target!r} is another architecture's name; this model's {what}: {', '.join(map(repr, names))}"
    close = difflib.get_close_matches(leaf, available, n=3, cutoff=0.5)
    return f"{target!r}: did you mean {', '.join(map(repr, close))}?" if close else f"{target!r}: no similar name"


def validate_targets(model: nn.Module, targets: str | Iterable[str]) -> list[str]:
    """Check LoRA targets the way peft matches them; raise ValueError naming every target that matches nothing.

    `targets` is "all-linear", a regex string (peft: full match on module names) or a list of names
    (peft: a module matches when its full name equals the target or ends with "." + target). Returns the
    resolved list (the leaf names for "all-linear", the matched module names for a regex, else the targets).
    Warns when a target hits the output head or the input embedding.
    """
    names = [n for n, _ in model.named_modules() if n]
    available = linear_module_names(model)
    if isinstance(targets, str):
        if targets.lower() == ALL_LINEAR:
            return available
        matched = [n for n in names if re.fullmatch(targets, n)]
        if not matched:
            raise ValueError(
                f"LoRA target regex {targets!r} matches no module (peft uses re.fullmatch on full module "
                f"names such as {names[-1]!r}). Adaptable layers: {available}"
            )
        return matched
    targets = list(dict.fromkeys(targets))
    if not targets:
        raise ValueError(f"no LoRA targets given. Adaptable layers: {available}")
    missing = [t for t in targets if not any(_matches(t, n) for n in names)]
    if missing:
        hints = "\n".join("  - " + suggest(model, t, available) for t in missing)
        silent = (
            "peft would build without error and silently adapt only the others."
            if len(missing) < len(targets) else "peft would refuse to build (no target found)."
        )
        raise ValueError(
            f"{len(missing)} of {len(targets)} LoRA target(s) match no module in {type(model).__name__}: "
            f"{missing}.\n{silent}\n{hints}\n"
            f"Adaptable layers (leaf names): {available}; presets: {target_presets(model)}"
        )
    by_role = leaves_by_role(model)
    special = [t for t in targets if any(_matches(t, n) for n in by_role["embedding"] + by_role["head"])]
    if special:
        warnings.warn(f"LoRA targets {special} hit the embedding/output head: {_HEAD_ADVICE}", stacklevel=2)
    return targets


# ---------------------------------------------------------------------------------------------- counting
def _in_out(module: nn.Module) -> tuple[int, int]:
    """(in, out) sizes LoRA sees for a layer: Linear, GPT-2 Conv1D (weight is in×out) or Embedding (vocab, dim)."""
    module = roles.base_layer(module)
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, roles.linear_types()):  # GPT-2's Conv1D: weight is in x out
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(f"LoRA sizes unknown for {type(module).__name__}")


def matched_modules(model: nn.Module, targets: str | Iterable[str]) -> list[str]:
    """Full names of the layers peft would adapt for `targets` (list suffix rule, regex, or "all-linear")."""
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        return [n for n, _ in roles.linear_layers(model)]
    out = []
    for name, module in roles.visible_modules(model):  # a peft wrapper stands for its layer
        if not name:
            continue
        hit = re.fullmatch(targets, name) if isinstance(targets, str) else any(_matches(t, name) for t in targets)
        if hit and isinstance(roles.base_layer(module), (*roles.linear_types(), nn.Embedding)):
            out.append(name)
    return out


def expected_lora_params(model: nn.Module, targets: str | Iterable[str], r: int) -> int:
    """Closed-form LoRA parameter count: sum over adapted layers of r * (in + out) (A is r×in, B is out×r)."""
    names = set(matched_modules(model, targets))
    return sum(r * sum(_in_out(m)) for n, m in model.named_modules() if n in names)


def lora_summary(peft_model: nn.Module) -> dict:
    """Trainable/total parameters, trainable fraction, adapted layers per leaf name, number of LoRA tensors."""
    tuner = roles.tuner_classes()
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    per_target: dict[str, int] = {}
    for name, module in peft_model.named_modules():
        if tuner and isinstance(module, tuner) and _lora_adapters(module):
            leaf = name.rsplit(".", 1)[-1]
            per_target[leaf] = per_target.get(leaf, 0) + 1
    n_tensors = sum(1 for n, p in peft_model.named_parameters() if "lora_" in n)
    lora_params = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    return {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_fraction": trainable / total if total else 0.0,
        "lora_params": lora_params,
        "adapted_layers": sum(per_target.values()),
        "adapted_per_target": per_target,
        "n_lora_tensors": n_tensors,
    }


def _lora_adapters(module: nn.Module) -> bool:
    """True if a peft tuner layer carries at least one LoRA adapter (Linear/Conv1D or Embedding)."""
    return any(len(getattr(module, attr, None) or ()) for attr in ("lora_A", "lora_embedding_A"))


# ---------------------------------------------------------------------------------------------- gradients
def _partner(name: str) -> str | None:
    for a, b in (("lora_A.", "lora_B."), ("lora_embedding_A.", "lora_embedding_B.")):
        if a in name:
            return name.replace(a, b)
        if b in name:
            return name.replace(b, a)
    return None


def lora_grad_report(model: nn.Module) -> dict:
    """After backward: how many LoRA tensors (requires_grad, name contains "lora_") got a non-zero gradient.

    Returns {"n_tensors", "n_nonzero", "zero": [names], "zero_expected": [names]}. "zero_expected" holds
    tensors whose zero gradient is correct: LoRA starts with one factor at zero (lora_B for Linear,
    lora_embedding_A for Embedding), so before the first optimizer step its partner's gradient is exactly 0.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
    nonzero, zero, expected = 0, [], []
    for name, p in params.items():
        if p.grad is not None and bool(p.grad.detach().abs().sum() > 0):
            nonzero += 1
            continue
        partner = params.get(_partner(name) or "")
        if partner is not None and not bool(partner.detach().abs().sum() > 0):
            expected.append(name)
        else:
            zero.append(name)
    return {"n_tensors": len(params), "n_nonzero": nonzero, "zero": zero, "zero_expected": expected}


def check_lora_gradients(model: nn.Module, batch: Mapping | None = None) -> dict:
    """Every LoRA tensor must get a non-zero gradient; raise RuntimeError with the likely cause otherwise.

    With `batch` (a dict of tensors including "labels") runs train(), forward, backward itself and zeroes the
    gradients afterwards; without it, inspects the gradients of the backward pass you already ran.
    """
    if batch is not None:
        device = next(model.parameters()).device
        model.train()
        model.zero_grad(set_to_none=True)
        out = model(**{k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()})
        out.loss.backward()
    report = lora_grad_report(model)
    if batch is not None:
        model.zero_grad(set_to_none=True)
    if report["n_tensors"] == 0:
        raise RuntimeError(
            "no trainable LoRA tensors: the targets matched nothing or the model is not a peft model. "
            "Run helpers.lora.validate_targets(model, targets) before get_peft_model()."
        )
    if report["zero"]:
        shown = report["zero"][:6] + (["..."] if len(report["zero"]) > 6 else [])
        causes = [
            "a frozen path: with activation/gradient checkpointing call model.enable_input_require_grads() "
            "(prepare_model_for_kbit_training does) or use non-reentrant checkpointing",
            "adapters on layers the loss never uses (e.g. stale or wrong target names: validate_targets)",
        ]
        if any(quant.is_4bit_linear(m) for m in model.modules()) and next(model.parameters()).device.type == "cpu":
            causes.insert(0, (
                "the bitsandbytes CPU bug (docs/sources.md#bnb-cpu-repack in the course repository): a forward pass of a 4-bit model in eval mode without "
                "gradients (generate(), an eval loop) repacks its weights and backward stops flowing through "
                "them. Reload the model before training, keep the 4-bit model in train() mode when generating "
                "before training, and use no eval_strategy with 4-bit on CPU"
            ))
        raise RuntimeError(
            f"{len(report['zero'])} of {report['n_tensors']} LoRA tensors received no gradient: {shown}. "
            "Likely causes: " + "; ".join(f"({i + 1}) {c}" for i, c in enumerate(causes)) + "."
        )
    return report
