"""Quantization: the BitsAndBytesConfig builder and storage arithmetic (bytes per weight by format).

Storage formats (bitsandbytes): NF4/FP4 pack two 4-bit codes per byte and keep one absmax per block of
`blocksize` (64) weights, stored in fp32 (4 bytes). Double quantization stores those absmax values in
8 bits instead, plus one fp32 scale (and offset) per `dq_blocksize` (256) absmax values. LLM.int8 keeps
one int8 per weight plus one fp32 scale per output row.
"""

from __future__ import annotations

from dataclasses import dataclass

QUANTIZATIONS = (None, "nf4", "fp4", "int8")
FULL_PRECISION_BITS = {"fp32": 32, "float32": 32, "bf16": 16, "bfloat16": 16, "fp16": 16, "float16": 16}


def bits_per_param(precision: str, blocksize: int = 64, double_quant: bool = False, dq_blocksize: int = 256) -> float:
    """Average storage bits per weight for `precision` (fp32, bf16, fp16, int8, fp4, nf4), block overhead included."""
    p = precision.lower()
    if p in FULL_PRECISION_BITS:
        return float(FULL_PRECISION_BITS[p])
    if p == "int8":
        return 8.0  # + one fp32 scale per output row: see weight_bytes(rows=...)
    if p in ("nf4", "fp4"):
        if double_quant:
            # 8-bit absmax per block + (fp32 scale + fp32 offset) per dq_blocksize absmax values
            return 4.0 + 8.0 / blocksize + 64.0 / (blocksize * dq_blocksize)
        return 4.0 + 32.0 / blocksize
    raise ValueError(f"unknown precision {precision!r}; use one of fp32, bf16, fp16, int8, fp4, nf4")


def weight_bytes(n_params: int, precision: str, blocksize: int = 64, double_quant: bool = False, rows: int = 0) -> float:
    """Bytes to store `n_params` weights in `precision`; `rows` adds int8's fp32 per-row scales."""
    total = n_params * bits_per_param(precision, blocksize, double_quant) / 8
    if precision.lower() == "int8":
        total += 4 * rows
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
