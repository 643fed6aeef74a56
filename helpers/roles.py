"""What role a module plays in a decoder: embedding, head, norm, attention in/out, MLP or other.

The one home of that idea; `arch` (parameters by role), `quant` (bytes by kind) and `lora` (targets by role) call it.
Roles come from the model's *structure*, not from a table of layer names:

- the **decoder blocks** are the entries of the (outermost) `nn.ModuleList` whose every entry holds an attention
  module; a model without such a list falls back to the parents of its attention modules;
- inside a block, the **attention** module is the submodule whose attribute or class name matches
  attention/attn/mixer, or which holds q/k/v-like projections; its **output** projection is the last linear
  layer its `forward()` calls, the others are its in-projections;
- **every other** adaptable linear layer of the block is **MLP**: inside an `mlp`/`feed_forward` submodule, a direct
  child of the block (OPT's `fc1`/`fc2`) or inside MoE experts, so attention + MLP always split a block's layers;
- linear layers outside the blocks are "other"; the output head (`get_output_embeddings()`) is never adaptable.

Bottom-level module: imports no other helper; torch, transformers and peft (to see through LoRA wrappers) lazily.
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import sys
import textwrap
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily, like the rest of helpers/
    from torch import nn

LINEAR_ROLES = ("attention_in", "attention_out", "mlp", "other")
GROUP_OF = {"attention_in": "attention", "attention_out": "attention", "mlp": "mlp", "other": "other"}
MODULE_KINDS = ("embedding", "head", "norm", "linear", "other")
PARAM_KINDS = ("embedding", "head", "norm", "linear", "bias", "other")

_ATTENTION_RE = re.compile(r"attention|attn|mixer", re.IGNORECASE)
_QUERY_CHILD_RE = re.compile(r"^(q|query)(_a)?(_?proj)?$", re.IGNORECASE)
_FUSED_QKV_RE = re.compile(r"^(w?qkv(_proj)?|query_key_value|c_attn|in_proj)$", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------- layers
@functools.lru_cache(maxsize=1)
def linear_types() -> tuple[type, ...]:
    """Layer classes LoRA adapts as linear maps: nn.Linear (bitsandbytes 4/8-bit subclass it) and GPT-2's Conv1D."""
    from torch import nn

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a hard dependency of the course
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


@functools.lru_cache(maxsize=1)
def _peft_wrappers() -> tuple[type, ...]:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:  # pragma: no cover
        return ()
    return (BaseTunerLayer, AuxiliaryTrainingWrapper)


def tuner_classes() -> tuple[type, ...]:
    """peft's wrapper classes (adapter layers, modules_to_save wrappers); () while peft is not imported (none can exist)."""
    return _peft_wrappers() if "peft" in sys.modules else ()


def base_layer(module: nn.Module) -> nn.Module:
    """The wrapped layer of a peft wrapper (lora.Linear → its nn.Linear; modules_to_save → the original), else itself."""
    tuners = tuner_classes()
    if tuners and isinstance(module, tuners):
        if hasattr(module, "get_base_layer"):
            return module.get_base_layer()
        if getattr(module, "original_module", None) is not None:
            return module.original_module
    return module


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear (bitsandbytes Linear4bit/Linear8bitLt included), GPT-2's Conv1D, or a peft wrapper of one."""
    return isinstance(base_layer(module), linear_types())


def head_module(model: nn.Module) -> nn.Module | None:
    """The output head (`get_output_embeddings()`, unwrapped), or None."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return base_layer(head) if head is not None else None


def embedding_module(model: nn.Module) -> nn.Module | None:
    """The input embedding (`get_input_embeddings()`, unwrapped), or None."""
    getter = getattr(model, "get_input_embeddings", None)
    emb = getter() if callable(getter) else None
    return base_layer(emb) if emb is not None else None


def module_kind(module: nn.Module, head: nn.Module | None = None, embedding: nn.Module | None = None) -> str:
    """What a parameter-owning module is: 'head', 'embedding', 'norm', 'linear' or 'other' (see MODULE_KINDS)."""
    from torch import nn

    base = base_layer(module)
    if head is not None and base is head:
        return "head"
    if (embedding is not None and base is embedding) or isinstance(base, nn.Embedding):
        return "embedding"
    if "norm" in type(base).__name__.lower():
        return "norm"
    if isinstance(base, linear_types()):
        return "linear"
    return "other"


def param_kind(
    module: nn.Module, param_name: str, head: nn.Module | None = None, embedding: nn.Module | None = None
) -> str:
    """`module_kind` of a tensor's owner, except that a bias of a linear or other module is 'bias' (PARAM_KINDS)."""
    kind = module_kind(module, head, embedding)
    return "bias" if param_name == "bias" and kind in ("linear", "other") else kind


def visible_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """`model.named_modules()` with each peft wrapper standing for its layer: what it wraps (base_layer, lora_A,
    lora_B, saved copies) is skipped. The one place that looks through LoRA wrappers (lora and linear_layers use it)."""
    tuners = tuner_classes()
    out, inside = [], []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if tuners and isinstance(module, tuners):
            inside.append(name)
        out.append((name, module))
    return out


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(full name, module) of every adaptable linear-like layer, in model order, output head excluded.

    Inside a peft model, a wrapper counts as the layer (`visible_modules`).
    """
    head = head_module(model)
    return [(name, m) for name, m in visible_modules(model)
            if name and is_linear_like(m) and base_layer(m) is not head]


# ---------------------------------------------------------------------------------------------- structure
def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _within(name: str, prefix: str) -> bool:
    """True if module `name` lies strictly inside module `prefix` ("" is the root)."""
    return name != prefix and (prefix == "" or name.startswith(prefix + "."))


def _outermost(names: list[str]) -> list[str]:
    """The names not inside another of `names` (model order kept)."""
    return [n for n in names if not any(_within(n, o) for o in names)]


def _looks_like_attention(name: str, module: nn.Module) -> bool:
    """Attribute or class name says attention/attn/mixer, or the module holds a query or fused q/k/v projection."""
    label = f"{name.rsplit('.', 1)[-1]} {type(module).__name__}"
    if _ATTENTION_RE.search(label):
        return True
    children = [n for n, c in module.named_children() if is_linear_like(c)]
    return any(_QUERY_CHILD_RE.match(c) or _FUSED_QKV_RE.match(c) for c in children)


def _attention_candidates(model: nn.Module, linear_names: list[str]) -> list[str]:
    """Non-linear modules that look like attention and hold at least one adaptable linear layer."""
    holders = {".".join(n.split(".")[:i]) for n in linear_names for i in range(1, n.count(".") + 1)}
    return [
        name for name, module in model.named_modules()
        if name in holders and not is_linear_like(module) and _looks_like_attention(name, module)
    ]


def _blocks(model: nn.Module, candidates: list[str]) -> list[str]:
    """Decoder blocks: entries of the outermost ModuleLists whose every entry holds an attention candidate."""
    from torch import nn

    blocks: list[str] = []
    for lst, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module) or any(_within(lst, b) for b in blocks):
            continue
        entries = [f"{lst}.{c}" if lst else c for c, _ in module.named_children()]
        if all(any(_within(c, e) for c in candidates) for e in entries):
            blocks += entries
    # no such list: the parent of each (outermost) attention module that is neither a block nor holds one
    loose = [c for c in candidates if not any(c == b or _within(c, b) or _within(b, c) for b in blocks)]
    return blocks + list(dict.fromkeys(_parent(c) for c in _outermost(loose)))


def _projections(model: nn.Module, linear_names: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(decoder blocks, attention module -> its linear layers in call order) from the adaptable layers' names."""
    candidates = _attention_candidates(model, linear_names)
    blocks = _blocks(model, candidates)
    attention: dict[str, list[str]] = {}
    for block in blocks:
        for attn in _outermost([c for c in candidates if _within(c, block)]):
            rel = [n[len(attn) + 1:] for n in linear_names if _within(n, attn)]
            attention[attn] = [f"{attn}.{r}" for r in call_order(model.get_submodule(attn), rel)]
    return blocks, attention


def decoder_blocks(model: nn.Module) -> list[str]:
    """Full names of the decoder blocks (e.g. model.layers.0, ...): see the module docstring for the rule."""
    return _projections(model, [n for n, _ in linear_layers(model)])[0]


def _self_calls(node: ast.AST) -> list[str]:
    """Names X of the `self.X(...)` calls under `node` in evaluation order (a call's arguments before the call)."""
    out = [name for child in ast.iter_child_nodes(node) for name in _self_calls(child)]
    func = getattr(node, "func", None)
    if isinstance(node, ast.Call) and isinstance(func, ast.Attribute) and getattr(func.value, "id", None) == "self":
        out.append(func.attr)
    return out


@functools.lru_cache(maxsize=256)
def _calls(cls: type, method: str = "forward", depth: int = 0) -> tuple[str, ...]:
    """What `cls.<method>` calls as `self.X(...)`, in evaluation order, the class's own helper methods inlined."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(getattr(cls, method))))
    except (AttributeError, OSError, TypeError, SyntaxError):
        return ()
    out: list[str] = []
    for name in _self_calls(tree):
        if depth < 3 and name != method and inspect.isfunction(getattr(cls, name, None)):
            out += _calls(cls, name, depth + 1)
        else:
            out.append(name)
    return tuple(out)


def call_order(module: nn.Module, children: list[str]) -> list[str]:
    """`children` (names relative to `module`) in the order its forward() first calls them; uncalled ones last.

    Warns when forward() calls none of them (its source cannot be read, or it calls them in a way this parser
    does not see): the order is then the registration order, which need not be the call order (Phi-3 registers
    its output projection o_proj before qkv_proj), so the attention output projection may be misidentified.
    """
    calls = _calls(type(module))
    first = {}
    for i, c in enumerate(calls):
        first.setdefault(c, i)
    if children and not any(c.split(".")[0] in first for c in children):
        warnings.warn(f"cannot tell in which order {type(module).__name__}.forward() calls {children} (its source is "
                      "unreadable or calls none of them as self.<name>(...)); keeping their registration order, so "
                      "the last one is taken as the attention output projection", stacklevel=2)
    end = len(calls)
    return sorted(children, key=lambda c: first.get(c.split(".")[0], end))  # stable: uncalled keep their order


def attention_projections(model: nn.Module) -> dict[str, list[str]]:
    """Attention module full name -> full names of its adaptable linear layers, in the order forward() calls them."""
    return _projections(model, [n for n, _ in linear_layers(model)])[1]


def linear_roles(model: nn.Module) -> dict[str, str]:
    """Full name -> role (attention_in, attention_out, mlp, other) of every adaptable linear layer, model order."""
    linear_names = [n for n, _ in linear_layers(model)]
    blocks, attention = _projections(model, linear_names)
    roles = {n: "mlp" if any(_within(n, b) for b in blocks) else "other" for n in linear_names}
    for layers in attention.values():
        for name in layers:
            roles[name] = "attention_in"
        if len(layers) > 1:
            roles[layers[-1]] = "attention_out"
    return roles


def _name_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, module in model.named_modules():
        if module is target or base_layer(module) is target:
            return name
    return None


def leaves_by_role(model: nn.Module) -> dict[str, list[str]]:
    """Full module names by role: attention_in, attention_out, mlp, other (linear layers) + embedding, head."""
    out: dict[str, list[str]] = {role: [] for role in LINEAR_ROLES}
    for name, role in linear_roles(model).items():
        out[role].append(name)
    emb, head = _name_of(model, embedding_module(model)), _name_of(model, head_module(model))
    out["embedding"] = [emb] if emb else []
    out["head"] = [head] if head else []
    return out
