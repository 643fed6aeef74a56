"""Training memory, planned before a run: weights, LoRA state, activations, LM head — and per rank when sharded.

- :func:`estimate_memory`: what LoRA/QLoRA training holds on one process, by part (:class:`MemoryEstimate`),
  checked against measured peaks in notebook 04 (`memory_check` in its metrics.json).
- :func:`per_rank_memory`, :func:`communication_bytes`, :func:`unit_bytes`: the same estimate split over the
  ranks of DDP / FSDP / ZeRO-3, the bytes each rank sends per step, and the largest unit FSDP gathers (notebook 06).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from helpers import arch, lora, quant, roles

STRATEGIES = ("single", "ddp", "fsdp", "zero3")

# optimizer state bytes per trainable parameter
OPTIMIZER_BYTES = {"adamw": 8, "adamw_torch": 8, "adamw_torch_fused": 8, "paged_adamw_32bit": 8, "adamw_32bit": 8,
                   "adamw_8bit": 2, "paged_adamw_8bit": 2, "adamw_bnb_8bit": 2, "sgd": 0, "adafactor": 4}
# TRL's fused LM head (trl/kernels/chunked_logprob.py, TRL 1.16): it projects tiles of at most TOKEN_TILE tokens x
# LOGIT_CHUNK vocabulary columns into one buffer of exactly that width (even for a smaller vocabulary). Where Triton
# runs (CUDA) each tile is folded in place; the torch fallback (CPU) holds extra fp32 tile-sized temporaries during
# the backward pass: y, z, log p, p, the gradient, the target mask (1 byte), (mask - p) and its product with the
# incoming gradient = 7.25 tiles at 4 bytes per element (read off `_backward_tile`; torch.profiler agrees within 1 %).
LOGIT_CHUNK = 32768
TOKEN_TILE = 4096
CPU_HEAD_TEMPORARIES = 7.25


@dataclass
class MemoryEstimate:
    """Predicted training memory by part (bytes) and the assumptions behind it."""

    parts: dict[str, float]
    assumptions: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        """Sum of all parts, bytes."""
        return float(sum(self.parts.values()))

    def gib(self) -> dict[str, float]:
        """Parts and total in GiB, rounded to 3 decimals."""
        return {**{k: round(v / 2**30, 3) for k, v in self.parts.items()}, "total": round(self.total / 2**30, 3)}

    def fits(self, budget_gib: float) -> bool:
        """True if the total stays within `budget_gib`."""
        return self.total <= budget_gib * 2**30


def _skeleton(config_or_model):
    """A model (real or meta-device skeleton) and its config from a model, a config or a shipped config name."""
    if hasattr(config_or_model, "named_modules"):
        if getattr(config_or_model, "is_loaded_in_4bit", False) or getattr(config_or_model, "is_loaded_in_8bit", False):
            return arch.meta_model(config_or_model.config), config_or_model.config  # packed weights miscount numel()
        return config_or_model, config_or_model.config
    config = arch.load_config(config_or_model) if isinstance(config_or_model, str) else config_or_model
    return arch.meta_model(config), config


def _activation_elements_per_token(config, model, targets, lora_dropout: float, attention: str, seq_len: int) -> dict:
    """Elements saved for backward per token in one decoder layer, by part (a first-order count)."""
    h = config.hidden_size
    i = config.intermediate_size
    a = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or a
    d = getattr(config, "head_dim", None) or h // a
    gated = getattr(config, "hidden_act", "") in ("silu", "swish") or getattr(config, "model_type", "") in (
        "llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text", "phi3")
    parallel = getattr(config, "model_type", "") == "phi"  # attention and MLP read the same LayerNorm output
    attn = (1 + 1) * h + 2 * a * d + 2 * kv * d + a * d  # norm in/out, q and k (+rotated), v, attention output
    mlp = (0 if parallel else 2 * h) + (4 * i if gated else 3 * i)  # norm in/out; gate,up,act,product | fc1,act,tmp
    scores = 2 * a * seq_len if attention == "eager" else 0  # eager keeps softmax probs (+ dropout) per token
    # LoRA: dropout(x) is a new tensor per adapted layer (when dropout > 0), plus the rank-r output of lora_A
    layer = roles.decoder_blocks(model)[0]
    modules = dict(model.named_modules())
    adapted = [modules[n] for n in lora.matched_modules(model, targets) if n.startswith(layer + ".")]
    lora_part = sum(getattr(m, "in_features", 0) for m in adapted) if lora_dropout > 0 else 0
    return {"attention": attn + scores, "mlp": mlp, "lora": lora_part}


def lm_head_bytes(hidden: int, vocab: int, batch_size: int, seq_len: int, dtype: str = "float32",
                  device: str = "cpu") -> float:
    """Peak bytes of TRL's fused LM head in the backward pass: the tile buffer, CPU temporaries, fp32 hidden grads."""
    tokens = batch_size * max(seq_len - 1, 1)  # next-token labels: every position but the last
    rows = min(tokens, TOKEN_TILE)
    buffer = rows * LOGIT_CHUNK * quant.DTYPE_BYTES[dtype]
    if device == "cpu":  # a CPU page is resident only once written: the buffer costs the columns the tiles fill
        buffer = rows * min(vocab, LOGIT_CHUNK) * quant.DTYPE_BYTES[dtype]
    temporaries = CPU_HEAD_TEMPORARIES * rows * min(vocab, LOGIT_CHUNK) * 4 if device == "cpu" else 0.0
    return buffer + temporaries + tokens * hidden * (4 + quant.DTYPE_BYTES[dtype])  # + fp32 grad of the hidden states


def estimate_memory(
    config_or_model,
    quantization: str | None = None,
    dtype: str = "float32",
    lora_r: int = 16,
    lora_targets: str | list[str] = "all-linear",
    batch_size: int = 1,
    seq_len: int = 512,
    activation_checkpointing: bool = False,
    optimizer: str = "adamw_torch",
    adapter_dtype: str | None = None,
    lora_dropout: float = 0.05,
    attention: str = "sdpa",
    double_quant: bool = False,
    overhead_bytes: float = 0.0,
    device: str = "cuda",
) -> MemoryEstimate:
    """Predict the peak memory of LoRA/QLoRA training with TRL, by part (bytes).

    `config_or_model`: a loaded model, a transformers config, or a shipped config name ("phi-2"). Weights: the
    quantizable Linears at `quantization`, the rest at `dtype`. LoRA parameters, gradients and optimizer state per
    trainable parameter (`adapter_dtype`: TRL keeps adapters in bf16 for quantized models). Activations: per token
    per layer, the tensors saved for backward (checked against torch.profiler on SmolLM2), or each layer's input
    plus one layer recomputed (`activation_checkpointing`). The peak comes at the start of the backward pass, in
    the LM head (`lm_head_bytes`; `device` "cpu" adds the torch fallback's temporaries); the layers' backward
    working set counts where it exceeds the head's. `overhead_bytes`: held anyway (CPU: the live memory before loading).
    """
    model, config = _skeleton(config_or_model)
    n_params = sum(p.numel() for p in model.parameters())
    q_weights, q_rows = arch.quantizable(model) if quantization else (None, 0)  # Linear layers at `quantization`
    adapter_dtype = adapter_dtype or ("bfloat16" if quantization else "float32")
    n_lora = lora.expected_lora_params(model, lora_targets, lora_r)
    opt = OPTIMIZER_BYTES.get(optimizer.lower())
    if opt is None:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: {sorted(OPTIMIZER_BYTES)}")
    tokens, layers, act_bytes = batch_size * seq_len, config.num_hidden_layers, quant.DTYPE_BYTES[dtype]
    per_tok = _activation_elements_per_token(config, model, lora_targets, lora_dropout, attention, seq_len)
    per_layer = tokens * sum(per_tok.values()) * act_bytes
    activations = (layers * tokens * config.hidden_size * act_bytes + per_layer if activation_checkpointing
                   else layers * per_layer)
    vocab = model.get_output_embeddings().weight.shape[0]
    head = lm_head_bytes(config.hidden_size, vocab, batch_size, seq_len, dtype, device)
    parts = {
        "weights": quant.weight_bytes(n_params, quantization or dtype, double_quant=double_quant, rows=q_rows,
                                      quantized=q_weights, keep=dtype),
        "lora_params": n_lora * quant.DTYPE_BYTES[adapter_dtype],
        "gradients": n_lora * quant.DTYPE_BYTES[adapter_dtype],
        "optimizer_state": n_lora * opt,
        "activations": activations,
        "lm_head_working_set": head,
        "backward_working_set": max(0.0, per_layer - head),  # one layer's backward, beyond the head's peak
        "overhead": overhead_bytes,
    }
    assumptions = {
        "n_params": n_params, "lora_params": n_lora, "quantization": quantization, "dtype": dtype,
        "adapter_dtype": adapter_dtype, "optimizer": optimizer, "batch_size": batch_size, "seq_len": seq_len,
        "activation_checkpointing": activation_checkpointing, "attention": attention, "device": device,
        "activation_elements_per_token_per_layer": per_tok, "layers": layers,
    }
    return MemoryEstimate(parts, assumptions)


GROWTH_PARTS = ("gradients", "optimizer_state", "activations", "lm_head_working_set", "backward_working_set")


def check_plan(plan: MemoryEstimate, peak: Mapping, model_loaded: bool = True) -> dict[str, float | str]:
    """Predicted vs measured peak (GiB) for a run's `peak_memory` record (`helpers.train.training_metrics`).

    The plan's overhead becomes what the process held besides the model when the measurement started (measured:
    start_bytes - model_bytes on CPU, or start_bytes when it started before the model was loaded, `model_loaded`
    False; 0 on CUDA, where max_memory_allocated counts tensors only). Returns the
    predicted and measured peak, their ratio, the predicted and measured growth during training and, on CPU, the
    freed memory the allocator kept (RSS peak - live peak), which the plan leaves out. On CPU the weights must be
    resident when training starts (after any forward pass: weights loaded from safetensors are memory-mapped and
    page in on first use), or the overhead comes out too small by what is not yet paged in.
    """
    held_model = peak["model_bytes"] if model_loaded else 0
    overhead = peak["start_bytes"] - held_model if peak["device"] == "cpu" else 0.0
    predicted = plan.total - plan.parts["overhead"] + overhead
    growth = sum(plan.parts[k] for k in GROWTH_PARTS) + (0 if model_loaded else plan.parts["weights"])
    gib = 2**30
    out = {"kind": peak["kind"], "predicted_gib": predicted / gib, "measured_gib": peak["peak_bytes"] / gib,
           "ratio": peak["peak_bytes"] / predicted, "overhead_gib": overhead / gib,
           "growth_predicted_gib": growth / gib, "growth_measured_gib": (peak["peak_bytes"] - peak["start_bytes"]) / gib}
    if "peak_rss_bytes" in peak:
        out["allocator_retained_gib"] = (peak["peak_rss_bytes"] - peak["peak_bytes"]) / gib
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def unit_bytes(config_or_name, quantization: str | None, dtype: str, double_quant: bool = False) -> dict[str, float]:
    """Bytes of the largest sharding unit: one decoder layer (Linear at `quantization`) and the root (embeddings, head)."""
    from torch import nn

    config = arch.load_config(config_or_name) if isinstance(config_or_name, str) else config_or_name
    model = arch.meta_model(config)
    blocks = roles.decoder_blocks(model)
    layer = model.get_submodule(blocks[0])
    lin = sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear))
    rest = sum(p.numel() for p in layer.parameters()) - lin
    layer_b = quant.weight_bytes(lin + rest, quantization or dtype, double_quant=double_quant, quantized=lin, keep=dtype)
    root = sum(p.numel() for p in model.parameters()) - len(blocks) * sum(p.numel() for p in layer.parameters())
    return {"layer": layer_b, "root": quant.weight_bytes(root, dtype)}


def per_rank_memory(estimate, strategy: str, world_size: int, unit_bytes: float = 0.0) -> dict[str, float]:
    """Split a single-process `estimate_memory` result into what ONE rank holds, in bytes.

    - single / ddp: every rank holds everything (DDP replicates the model; only the batch is split).
    - fsdp (FULL_SHARD) / zero3: weights, LoRA parameters, gradients and optimizer state are divided by the
      world size, plus `unit_bytes` — the largest unit (a layer, or the root with embeddings and head)
      gathered in full while it computes. Activations and the LM-head working set belong to the rank's own
      per-device batch and do not shrink.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    parts = dict(estimate.parts)
    if strategy in ("fsdp", "zero3"):
        for key in ("weights", "lora_params", "gradients", "optimizer_state"):
            parts[key] = parts[key] / world_size
        parts["gathered_unit"] = unit_bytes
    parts["total"] = sum(v for k, v in parts.items() if k != "total")
    return parts


def communication_bytes(estimate, strategy: str, world_size: int) -> float:
    """Bytes each rank sends per optimizer step (ring collectives): DDP all-reduces the gradients, FSDP/ZeRO-3
    all-gather the weights for forward and again for backward and reduce-scatter the gradients."""
    if world_size <= 1 or strategy == "single":
        return 0.0
    f = (world_size - 1) / world_size
    grads = estimate.parts["gradients"]
    if strategy == "ddp":
        return 2 * f * grads
    if strategy in ("fsdp", "zero3"):
        return f * (2 * estimate.parts["weights"] + estimate.parts["lora_params"] + grads)
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")


__all__ = ["OPTIMIZER_BYTES", "STRATEGIES", "MemoryEstimate", "check_plan", "communication_bytes", "estimate_memory",
           "lm_head_bytes", "per_rank_memory", "unit_bytes"]
