"""helpers.memory: the training-memory planner (exact parts, scaling, the Phi-2 T4 case) and the per-rank split."""

import pytest
import torch

from helpers import memory


def test_estimate_memory_parts_are_what_a_real_lora_model_holds(tiny):
    """Oracle: the bytes real objects hold — the model's parameters, peft's LoRA tensors, their gradients after a
    backward pass, and torch.optim.AdamW's state after one step (exp_avg + exp_avg_sq; the step counter aside)."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    model, _ = tiny
    est = memory.estimate_memory(model, dtype="float32", lora_r=8, batch_size=2, seq_len=64, lora_dropout=0.0)
    assert est.parts["weights"] == sum(p.nbytes for p in model.parameters())  # a tied weight is yielded once
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.0))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert est.parts["lora_params"] == sum(p.nbytes for p in trainable) > 0
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    assert est.parts["gradients"] == sum(p.grad.nbytes for p in trainable)
    opt = torch.optim.AdamW(trainable)
    opt.step()
    assert est.parts["optimizer_state"] == sum(t.nbytes for st in opt.state.values() for k, t in st.items() if k != "step")
    ckpt = memory.estimate_memory(model, dtype="float32", lora_r=8, batch_size=2, seq_len=64, lora_dropout=0.0,
                                 activation_checkpointing=True)
    assert ckpt.parts["activations"] < est.parts["activations"]
    double = memory.estimate_memory(model, dtype="float32", lora_r=8, batch_size=4, seq_len=64, lora_dropout=0.0)
    assert double.parts["activations"] == 2 * est.parts["activations"]  # linear in batch (sdpa)
    eager = memory.estimate_memory(model, dtype="float32", lora_r=8, batch_size=2, seq_len=64, attention="eager")
    assert eager.parts["activations"] > est.parts["activations"]
    nf4 = memory.estimate_memory(model, quantization="nf4", dtype="float32", lora_r=8)
    assert nf4.parts["weights"] < est.parts["weights"] and nf4.assumptions["adapter_dtype"] == "bfloat16"
    assert est.total == sum(est.parts.values()) and est.fits(1.0)
    with pytest.raises(ValueError, match="unknown optimizer"):
        memory.estimate_memory(model, optimizer="lion")


def test_phi2_qlora_recipe_on_a_t4():
    targets = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
    kw = dict(quantization="nf4", dtype="float16", lora_r=32, lora_targets=targets, batch_size=1, seq_len=2048,
              optimizer="paged_adamw_32bit", lora_dropout=0.1, overhead_bytes=0.5 * 2**30)
    est = memory.estimate_memory("phi-2", activation_checkpointing=True, **kw)
    assert est.assumptions["n_params"] == 2_779_683_840  # notebook 01: meta-device skeleton from Phi-2's config
    assert est.assumptions["lora_params"] == 32 * (4 * 32 * (2560 + 2560) + 2 * 32 * (2560 + 10240))
    assert 1.4 < est.parts["weights"] / 2**30 < 2.2  # NF4 linears + fp16 embedding/head
    assert est.fits(16)
    no_ckpt = memory.estimate_memory("phi-2", activation_checkpointing=False, attention="eager", **kw)
    assert not no_ckpt.fits(16)  # the seed's settings (no checkpointing then) at 2048 tokens


def test_per_rank_memory_and_communication_arithmetic():
    est = memory.estimate_memory("phi-2", quantization="nf4", dtype="bfloat16", lora_r=16, batch_size=4, seq_len=256,
                                activation_checkpointing=True)
    units = memory.unit_bytes("phi-2", "nf4", "bfloat16")
    assert 30e6 < units["layer"] < 60e6  # one Phi-2 layer: 78.7M weights, 4-bit linear → ~40 MB
    assert units["root"] > units["layer"]  # embedding + head (2 × 51200 × 2560 in bf16) outweigh a 4-bit layer
    single = memory.per_rank_memory(est, "single", 1)
    ddp = memory.per_rank_memory(est, "ddp", 4)
    fsdp = memory.per_rank_memory(est, "fsdp", 4, unit_bytes=units["root"])
    assert single["total"] == pytest.approx(est.total) and ddp["total"] == pytest.approx(est.total)  # DDP replicates
    assert fsdp["weights"] == pytest.approx(est.parts["weights"] / 4)
    assert fsdp["activations"] == est.parts["activations"]  # each rank's own batch
    assert fsdp["total"] < ddp["total"]
    assert memory.communication_bytes(est, "ddp", 4) == pytest.approx(1.5 * est.parts["gradients"])  # 2(N-1)/N
    assert memory.communication_bytes(est, "fsdp", 4) > 20 * memory.communication_bytes(est, "ddp", 4)  # weights travel
    assert memory.communication_bytes(est, "ddp", 1) == 0
    with pytest.raises(ValueError):
        memory.per_rank_memory(est, "zero2", 2)


def test_lm_head_working_set_follows_trls_fused_head():
    # SmolLM2-135M (hidden 576, vocab 49152), batch 4 x 86 tokens on a CPU: torch.profiler's memory timeline showed
    # 350.6 MiB of temporaries at the start of the backward pass (the peak); on CUDA only the tile buffer remains
    cpu = memory.lm_head_bytes(576, 49152, batch_size=4, seq_len=86, dtype="float32", device="cpu")
    assert 340 < cpu / 2**20 < 360
    gpu = memory.lm_head_bytes(576, 49152, batch_size=4, seq_len=86, dtype="bfloat16", device="cuda")
    # oracle: the tensors TRL's backward (ChunkedLogprob.backward in trl/kernels/chunked_logprob.py) allocates, with
    # TRL's own tile sizes: the projection buffer mm_buf, the fp32 grad_hidden and the bf16 copy of the hidden states
    from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    tokens = 4 * (86 - 1)  # next-token labels: every position but the last
    mm_buf = torch.empty((min(tokens, TOKEN_CHUNK_SIZE), _CHUNKED_LOGPROB_CHUNK_SIZE), dtype=torch.bfloat16, device="meta")
    grad_hidden = torch.empty((tokens, 576), dtype=torch.float32, device="meta")
    hidden_chunk = torch.empty((tokens, 576), dtype=torch.bfloat16, device="meta")
    assert gpu == mm_buf.nbytes + grad_hidden.nbytes + hidden_chunk.nbytes and gpu < cpu / 4
    tiny_vocab = memory.lm_head_bytes(160, 512, batch_size=2, seq_len=177, device="cpu")  # tiles as wide as the vocab
    assert tiny_vocab < 8 * 2**20


def test_check_plan_uses_the_measured_overhead_and_says_what_the_allocator_kept():
    plan = memory.MemoryEstimate({"weights": 1.0 * 2**30, "lora_params": 0.0, "gradients": 0.0, "optimizer_state": 0.0,
                                  "activations": 0.5 * 2**30, "lm_head_working_set": 0.25 * 2**30,
                                  "backward_working_set": 0.0, "overhead": 0.3 * 2**30})
    peak = {"device": "cpu", "kind": "live", "start_bytes": 1.5 * 2**30, "model_bytes": 1.0 * 2**30,
            "peak_bytes": 2.25 * 2**30, "peak_rss_bytes": 2.5 * 2**30}
    check = memory.check_plan(plan, peak)
    assert check["overhead_gib"] == 0.5 and check["predicted_gib"] == 2.25 and check["ratio"] == 1.0
    assert check["growth_predicted_gib"] == check["growth_measured_gib"] == 0.75
    assert check["allocator_retained_gib"] == 0.25
    cuda = memory.check_plan(plan, {**peak, "device": "cuda", "kind": "max_allocated"})
    assert cuda["overhead_gib"] == 0 and cuda["predicted_gib"] == 1.75
    # measured from before the model was loaded (notebook 04): all of start is overhead, the weights are growth
    before = memory.check_plan(plan, {**peak, "start_bytes": 0.5 * 2**30}, model_loaded=False)
    assert before["overhead_gib"] == 0.5 and before["predicted_gib"] == 2.25 and before["ratio"] == 1.0
    assert before["growth_predicted_gib"] == before["growth_measured_gib"] == 1.75
