"""Quantization: the BitsAndBytesConfig builder and storage arithmetic (bytes per weight by format).

Storage formats (bitsandbytes): NF4/FP4 pack two 4-bit codes per byte and keep one absmax per block of
`blocksize` (64) weights, stored in fp32 (4 bytes). Double quantization stores those absmax values in
8 bits instead, plus one fp32 scale (and offset) per `dq_blocksize` (256) absmax values. LLM.int8 keeps
one int8 per weight plus one fp32 scale per output row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from helpers import roles

QUANTIZATIONS = (None, "nf4", "fp4", "int8")
LOW_BIT = ("int8", "nf4", "fp4")
# bytes per element of the full-precision dtypes, by torch name and short name (the one table of dtype widths)
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


def bits_per_param(precision: str, blocksize: int = 64, double_quant: bool = False, dq_blocksize: int = 256) -> float:
    """Average storage bits per weight for `precision` (fp32, bf16, fp16, int8, fp4, nf4), block overhead included."""
    p = precision.lower()
    if p in DTYPE_BYTES:
        return 8.0 * DTYPE_BYTES[p]
    if p == "int8":
        return 8.0  # + one fp32 scale per output row: see weight_bytes(rows=...)
    if p in ("nf4", "fp4"):
        if double_quant:
            # 8-bit absmax per block + (fp32 scale + fp32 offset) per dq_blocksize absmax values
            return 4.0 + 8.0 / blocksize + 64.0 / (blocksize * dq_blocksize)
        return 4.0 + 32.0 / blocksize
    raise ValueError(f"unknown precision {precision!r}; use one of fp32, bf16, fp16, int8, fp4, nf4")


def weight_bytes(n_params: int, precision: str, blocksize: int = 64, double_quant: bool = False, rows: int = 0,
                 quantized: int | None = None, keep: str = "bf16") -> float:
    """Bytes to store `n_params` weights in `precision`; `rows` adds int8's fp32 per-row scales.

    With `quantized` set and a 4/8-bit `precision`, only that many weights (the quantizable Linear layers, see
    `quantizable_linears`) take it and the rest (embedding, head, norms, biases) stays in `keep`, as bitsandbytes
    does. The one place that adds up "quantized part + the rest".
    """
    low_bit = precision.lower() in LOW_BIT
    q = n_params if quantized is None or not low_bit else quantized
    if not 0 <= q <= n_params:
        raise ValueError(f"quantized={quantized} must be between 0 and n_params={n_params}")
    total = q * bits_per_param(precision, blocksize, double_quant) / 8
    if precision.lower() == "int8":
        total += 4 * rows
    if q < n_params:
        total += (n_params - q) * bits_per_param(keep) / 8
    return total


@dataclass
class QuantSpec:
    """What to ask bitsandbytes for: None (full precision), 'nf4', 'fp4' or 'int8'."""

    quantization: str | None = None
    compute_dtype: str = "float32"
    double_quant: bool = False
    quant_storage: str = "uint8"

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}. "
                "Use 'nf4' for QLoRA (4-bit NormalFloat), 'fp4', 'int8' or None for full precision."
            )
        if self.double_quant and self.quantization not in ("nf4", "fp4"):
            raise ValueError("double_quant applies to 4-bit formats only (nf4, fp4)")


def bnb_config(
    quantization: str | None,
    compute_dtype: str = "float32",
    double_quant: bool = False,
    quant_storage: str = "uint8",
):
    """A `transformers.BitsAndBytesConfig` for nf4/fp4/int8, or None for full precision.

    The compute dtype should match the training dtype (bf16 where supported, fp16 on a T4, fp32 on CPU):
    the seed's fp16 compute with bf16 training mixes two dtypes for no gain.
    """
    spec = QuantSpec(quantization, compute_dtype, double_quant, quant_storage)
    if spec.quantization is None:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if spec.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.quantization,
        bnb_4bit_compute_dtype=getattr(torch, spec.compute_dtype),
        bnb_4bit_use_double_quant=spec.double_quant,
        bnb_4bit_quant_storage=getattr(torch, spec.quant_storage),
    )


# ------------------------------------------------------------------------------ bytes of a loaded model
# bitsandbytes keeps the quantized codes in the module's `weight` parameter (Params4bit: two 4-bit codes per
# uint8; Int8Params: one int8 per weight) and the rest *outside* the parameter list: the 4-bit QuantState
# (absmax per block, the 16-entry code table, and with double quantization the 8-bit absmax plus a nested
# state) and the int8 per-row scales (SCB). model.get_memory_footprint() counts parameters and buffers only,
# so it misses those; the functions below count them.


def _own_weight(module):
    """The module's *own* `weight` parameter (not a peft wrapper's forwarded `.weight` property)."""
    return getattr(module, "_parameters", {}).get("weight")


def is_4bit_linear(module) -> bool:
    """True for a bitsandbytes 4-bit Linear (its own weight is a Params4bit)."""
    return type(_own_weight(module)).__name__ == "Params4bit"


def is_8bit_linear(module) -> bool:
    """True for a bitsandbytes LLM.int8 Linear (its own weight is an Int8Params)."""
    return type(_own_weight(module)).__name__ == "Int8Params"


def _tensor_bytes(t) -> int:
    """Storage bytes of a tensor (its elements times the element size)."""
    return t.numel() * t.element_size()


def quant_state_tensors(module) -> dict:
    """Tensors a bitsandbytes Linear holds outside its parameters, by name: 4-bit absmax/code/offset/state2.*, int8 SCB."""
    import torch

    weight = _own_weight(module)
    found = {}
    if is_4bit_linear(module):
        qs = getattr(weight, "quant_state", None)
        if qs is None:
            return {}
        found = {"absmax": qs.absmax, "code": qs.code, "offset": getattr(qs, "offset", None)}
        if getattr(qs, "state2", None) is not None:
            found.update({"state2.absmax": qs.state2.absmax, "state2.code": qs.state2.code})
    elif is_8bit_linear(module):
        scb = getattr(weight, "SCB", None)
        if scb is None:  # after the first forward bitsandbytes moves the scales into module.state
            scb = getattr(getattr(module, "state", None), "SCB", None)
        found = {"SCB": scb}
    return {k: t for k, t in found.items() if isinstance(t, torch.Tensor)}


def _layer_format(module) -> tuple[str, int, int]:
    """(format, original weight count, output rows) of a bitsandbytes Linear."""
    weight = _own_weight(module)
    if is_4bit_linear(module):
        qs = weight.quant_state
        rows, cols = (int(s) for s in qs.shape)
        return str(qs.quant_type), rows * cols, rows
    return "int8", weight.numel(), int(weight.shape[0])


FULL_PRECISION_KINDS = (*roles.PARAM_KINDS, "buffer")


class _Once:
    """Bytes of a tensor the first time it is seen, 0 after (shared code tables and tied weights count once)."""

    def __init__(self) -> None:
        self.seen: set = set()

    def __call__(self, t) -> int:
        key = id(t) if t.device.type == "meta" else (t.data_ptr(), t.numel(), t.dtype)
        if key in self.seen:
            return 0
        self.seen.add(key)
        return _tensor_bytes(t)


@dataclass
class _QuantizedTally:
    """The 4/8-bit Linear layers of a model: formats, original weight count and rows, packed and state bytes."""

    formats: dict[str, int] = field(default_factory=dict)
    params: int = 0
    rows: int = 0
    packed: int = 0
    state: int = 0
    tables: int = 0
    weights: set[int] = field(default_factory=set)


@dataclass
class _FullPrecisionTally:
    """The tensors that stay in full precision: parameter count, bytes, bytes by kind (FULL_PRECISION_KINDS)."""

    params: int = 0
    bytes: int = 0
    by_kind: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FULL_PRECISION_KINDS, 0))
    float_elements: int = 0  # elements and bytes of the floating-point tensors among them (buffers included)
    float_bytes: int = 0

    def add(self, t, nbytes: int, kind: str) -> None:
        """Count one tensor of `nbytes` (0 when already counted) under `kind`."""
        self.bytes += nbytes
        self.by_kind[kind] += nbytes
        if nbytes and t.is_floating_point():
            self.float_elements += t.numel()
            self.float_bytes += nbytes


def _tally_quantized(model, once: _Once) -> _QuantizedTally:
    """Step 1: every bitsandbytes Linear's format, weight count, rows, packed codes and quant-state bytes."""
    tally = _QuantizedTally()
    for module in model.modules():
        if not (is_4bit_linear(module) or is_8bit_linear(module)):
            continue
        fmt, n, rows = _layer_format(module)
        tally.formats[fmt] = tally.formats.get(fmt, 0) + 1
        tally.params += n
        tally.rows += rows
        tally.packed += once(_own_weight(module))
        tally.weights.add(id(_own_weight(module)))
        for key, t in quant_state_tensors(module).items():
            b = once(t)
            tally.state += b
            tally.tables += b if key.endswith("code") else 0
    return tally


def _tally_full_precision(model, once: _Once, skip: set[int]) -> _FullPrecisionTally:
    """Step 2: every other parameter and buffer, by kind (helpers.roles.param_kind; buffers are 'buffer')."""
    head, embedding = roles.head_module(model), roles.embedding_module(model)
    tally = _FullPrecisionTally()
    seen = set(skip)
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            tally.params += p.numel()
            tally.add(p, once(p), roles.param_kind(module, pname, head, embedding))
        for buf in module.buffers(recurse=False):
            tally.add(buf, once(buf), "buffer")
    return tally


def quantized_linear_bytes(model) -> dict:
    """Bytes actually held by a loaded model: 4/8-bit Linear weights (codes + quant state) vs full-precision tensors.

    Returns quantized_layers, formats ({"nf4": n, ...}), quantized_params (original weight count), quantized_rows,
    packed_weight_bytes, quant_state_bytes (of which code_table_bytes: the per-layer 16/256-entry lookup tables
    the storage formula ignores), quantized_bytes (= packed + state), bits_per_quantized_weight,
    full_precision_params, full_precision_bytes, full_precision_by_kind (FULL_PRECISION_KINDS: embedding, head
    (its bias included), norm, linear (unquantized Linear weights), bias, other, buffer),
    repacked_for_cpu (4-bit layers bitsandbytes has repacked, see `cpu_repacked_layers`), total_bytes.
    Tensors shared between layers (bitsandbytes' code tables, tied embeddings) are counted once.
    """
    once = _Once()
    q = _tally_quantized(model, once)
    fp = _tally_full_precision(model, once, skip=q.weights)
    quantized_bytes = q.packed + q.state
    return {
        "quantized_layers": sum(q.formats.values()),
        "formats": q.formats,
        "quantized_params": q.params,
        "quantized_rows": q.rows,
        "packed_weight_bytes": q.packed,
        "quant_state_bytes": q.state,
        "code_table_bytes": q.tables,
        "quantized_bytes": quantized_bytes,
        "bits_per_quantized_weight": 8 * quantized_bytes / q.params if q.params else 0.0,
        "full_precision_params": fp.params,
        "full_precision_bytes": fp.bytes,
        "full_precision_by_kind": fp.by_kind,
        "repacked_for_cpu": len(cpu_repacked_layers(model)),
        "total_bytes": quantized_bytes + fp.bytes,
    }


def cpu_repacked_layers(model) -> list[str]:
    """Names of 4-bit layers bitsandbytes has repacked for its CPU inference kernel (the silent bug: docs/sources.md#bnb-cpu-repack).

    bitsandbytes 0.50 repacks a Linear4bit on CPU the first time it runs in eval mode without gradients (on CPUs
    with AVX512-BF16): absmax goes to bf16 (undoing double quantization) and the layer then computes in bf16
    whatever its compute dtype. After that, backward no longer reaches LoRA adapters on inputs of those layers.
    A non-empty list before training means: reload the model.
    """
    return [
        name for name, m in model.named_modules()
        if is_4bit_linear(m) and getattr(_own_weight(m).quant_state, "packing_format_for_cpu", False)
    ]


def quantizable_linears(model) -> list[tuple[str, int, int]]:
    """(name, weight count, output rows) of the Linear layers bitsandbytes would quantize in `model`.

    For an already-quantized model: its 4/8-bit layers. Otherwise every nn.Linear except what transformers
    keeps in full precision (the output head, tied weights, the last module: `get_keys_to_not_convert`).
    Works on a meta-device skeleton (no weights needed).
    """
    from torch import nn
    from transformers import PreTrainedModel
    from transformers.quantizers.base import get_keys_to_not_convert

    done = [(n, *_layer_format(m)[1:]) for n, m in model.named_modules() if is_4bit_linear(m) or is_8bit_linear(m)]
    if done:
        return done
    if isinstance(model, PreTrainedModel):  # transformers' own rule; its errors are real errors
        skip = set(get_keys_to_not_convert(model))
    else:  # a plain torch module: every Linear but the output head, if it has one
        head = roles.head_module(model)
        skip = {n for n, m in model.named_modules() if head is not None and m is head}
    return [
        (n, m.weight.numel(), int(m.weight.shape[0]))
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not any(n == s or n.startswith(s + ".") for s in skip)
    ]


def theoretical_bytes(
    model,
    precision: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
    other_precision: str | None = None,
) -> dict:
    """What `model` should take in `precision`: the quantizable Linears by the storage formula, the rest as is.

    `other_precision` (e.g. "fp16") prices the floating-point tensors that stay unquantized (embeddings, head,
    norms, biases, buffers) at that width instead of their current dtype. Returns quantized_params,
    quantized_bytes, full_precision_params, full_precision_bytes, total_bytes, bits_per_quantized_weight.
    """
    layers = quantizable_linears(model)
    modules = dict(model.named_modules())
    q_params = sum(n for _, n, _ in layers)
    q_bytes = weight_bytes(q_params, precision, blocksize, double_quant, rows=sum(r for _, _, r in layers))
    rest = _tally_full_precision(model, _Once(), skip={id(_own_weight(modules[n])) for n, _, _ in layers})
    fp_bytes = float(rest.bytes)
    if other_precision:
        fp_bytes += rest.float_elements * bits_per_param(other_precision) / 8 - rest.float_bytes
    return {
        "precision": precision,
        "double_quant": double_quant,
        "quantized_params": q_params,
        "quantized_bytes": q_bytes,
        "bits_per_quantized_weight": 8 * q_bytes / q_params if q_params else 0.0,
        "full_precision_params": rest.params,
        "full_precision_bytes": fp_bytes,
        "total_bytes": q_bytes + fp_bytes,
    }
