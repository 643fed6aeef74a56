"""Right on every machine a reader has: the dtype decision on simulated GPUs, bitsandbytes' AVX-512 BF16 branch on/off.

1. **Simulated devices.** torch's own `torch.cuda.is_bf16_supported` runs unchanged; only what it reads is faked
   (availability, device properties, whether a bf16 tensor can be created), so a T4 (7.5) answers like a real T4:
   bf16 "supported" by emulation, not natively. Every dtype decision — the helpers and the recipe cells' own
   expressions, read from the notebooks — must pick fp16 on a T4/V100, bf16 on Ampere and later, fp32 without CUDA
   (Apple MPS included: the course runs on the CPU there).
2. **bitsandbytes' CPU repack** (bitsandbytes 0.50 `Linear4bit.forward`, docs/sources.md#bnb-cpu-repack): on a CPU
   with AVX-512 BF16, a 4-bit layer called in eval mode without grad repacks its weights for a bf16 kernel, and
   the repack assumes `in_features` is a multiple of the blocksize (64). The branch is switched on and off per layer
   (`support_avx512bf16_for_cpu`, read once in `Linear4bit.__init__`). The repack itself is torch code and runs on
   any CPU; the packed kernel's forward needs the instructions, so on a CPU without them that part is skipped, and
   says so.
"""

import ast
import json
import types
from pathlib import Path

import pytest
import torch

from helpers import bench, env, models, quant, train

ROOT = Path(__file__).resolve().parent.parent

# name, compute capability, total memory (GiB); the dtype a training run must use there
CARDS = {
    "T4": ((7, 5), 15, "float16"),
    "V100": ((7, 0), 16, "float16"),
    "A100": ((8, 0), 40, "bfloat16"),
    "L4": ((8, 9), 22, "bfloat16"),
    "H100": ((9, 0), 80, "bfloat16"),
}


@pytest.fixture
def simulate(monkeypatch):
    """simulate("T4" | "A100" | ... | "none" | "mps"): make torch see that machine (torch's own logic still decides)."""

    def apply(kind: str) -> None:
        has_cuda = kind in CARDS
        monkeypatch.setattr(torch.cuda, "is_available", lambda: has_cuda)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: int(has_cuda))
        monkeypatch.setattr(torch.version, "hip", None)
        mps = getattr(torch.backends, "mps", None)
        if mps is not None:
            monkeypatch.setattr(mps, "is_available", lambda: kind == "mps")
        if has_cuda:
            (major, minor), gib, _ = CARDS[kind]
            props = types.SimpleNamespace(major=major, minor=minor, name=f"NVIDIA {kind}", total_memory=gib * 2**30)
            monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
            monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
            # a real T4 can create a bf16 tensor: that is why is_bf16_supported() says True there by default
            monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)

    return apply


def expected(kind: str) -> str:
    return CARDS[kind][2] if kind in CARDS else "float32"


MACHINES = [*CARDS, "none", "mps"]


def test_the_simulation_is_faithful(simulate):
    """The trap itself, on the simulated T4: torch's default answer counts emulation, the native answer does not."""
    simulate("T4")
    assert torch.cuda.is_bf16_supported() is True
    assert torch.cuda.is_bf16_supported(including_emulation=False) is False
    assert torch.cuda.get_device_capability(0) == (7, 5) and torch.cuda.get_device_name(0) == "NVIDIA T4"
    simulate("A100")
    assert torch.cuda.is_bf16_supported(including_emulation=False) is True


@pytest.mark.parametrize("kind", MACHINES)
def test_helpers_pick_the_hardware_dtype(kind, simulate):
    simulate(kind)
    choice = env.choose_device()
    assert (choice.device, choice.dtype_name) == ("cuda" if kind in CARDS else "cpu", expected(kind)), choice
    assert env.training_dtype() == expected(kind)
    assert train.device_and_dtype(train.TrainConfig())[1] == expected(kind)
    if kind == "mps":
        assert "MPS" in choice.reason


@pytest.mark.parametrize("kind", MACHINES)
def test_the_trainer_gets_the_matching_precision_switches(kind, simulate):
    """What SFTConfig/DPOConfig receive: fp16 (with loss scaling) on a T4/V100, bf16 on Ampere+, neither on a CPU."""
    simulate(kind)
    device, dtype = train.device_and_dtype(train.TrainConfig())
    want = {"float16": (True, False, False), "bfloat16": (False, True, False), "float32": (False, False, True)}
    flags = train.precision_flags(device.device, dtype)
    assert (flags["fp16"], flags["bf16"], flags["use_cpu"]) == want[expected(kind)], (kind, flags)


@pytest.mark.parametrize("kind", ["T4", "V100"])
def test_bf16_asked_for_on_a_card_without_it_is_refused(kind, simulate):
    simulate(kind)
    with pytest.raises(ValueError, match="bf16 is not supported on NVIDIA"):
        env.training_dtype("bfloat16")
    with pytest.raises(ValueError, match="bf16 is not supported"):
        train.device_and_dtype(train.TrainConfig(dtype="bfloat16"))


def recipe_dtype_expressions() -> list[tuple[str, str]]:
    """(notebook, expression) for every assignment in a recipe cell that asks torch whether bf16 is supported."""
    found = []
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] != "code" or "recipe" not in cell["metadata"].get("tags", []):
                continue
            src = "".join(cell["source"])
            for node in ast.walk(ast.parse(src)):
                if isinstance(node, ast.Assign) and "is_bf16_supported" in ast.get_source_segment(src, node.value):
                    found.append((path.stem, ast.get_source_segment(src, node.value)))
    return found


def test_recipes_decide_the_dtype_in_one_expression():
    """Recipes that choose a dtype do it in one expression (so it can be checked), with emulation excluded."""
    found = recipe_dtype_expressions()
    assert {nb[:2] for nb, _ in found} >= {"04", "07"}, found
    for nb, expr in found:
        assert "including_emulation=False" in expr, f"{nb}: {expr} — a T4 would get bf16 (emulated)"


@pytest.mark.parametrize("kind", MACHINES)
def test_recipes_pick_what_the_helpers_pick(kind, simulate):
    simulate(kind)
    for nb, expr in recipe_dtype_expressions():
        got = eval(expr, {"torch": torch})  # noqa: S307 - the notebook's own expression, on the simulated machine
        name = str(got).removeprefix("torch.")  # a torch dtype, or its name (lm-eval's model_args take the name)
        assert name == env.choose_device().dtype_name, f"{nb} on {kind}: {expr} → {got}, helpers → {expected(kind)}"


# ------------------------------------------------------------------------------------------ bitsandbytes on CPU

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes.functional import (  # noqa: E402 - after the importorskip
    _convert_weight_packed_for_cpu,
    _convert_weight_packed_for_cpu_inverse,
    has_avx512bf16,
)

HAS_AVX512BF16 = bool(has_avx512bf16())
NO_KERNEL = "the packed kernel's forward needs AVX-512 BF16, which this CPU lacks (the repack itself ran above)"


@pytest.fixture
def tiny4(tiny_dir):
    """The tiny Phi in NF4 (double quantization) on the CPU, fp32 compute, seeded."""
    torch.manual_seed(0)
    return models.load_model(str(tiny_dir), quantization="nf4", dtype="float32", device="cpu", double_quant=True)


def four_bit_layers(model) -> list:
    return [m for m in model.modules() if quant.is_4bit_linear(m)]


def set_branch(model, on: bool) -> None:
    for m in four_bit_layers(model):
        m.support_avx512bf16_for_cpu = on


def test_course_models_have_blocksize_multiple_widths(tiny_dir):
    """Every 4-bit layer of the course's models takes an input width that is a multiple of the blocksize (64)."""
    from transformers import AutoConfig

    for folder in (tiny_dir, models.model_path("smollm2-135m")):
        cfg = AutoConfig.from_pretrained(folder)
        widths = {cfg.hidden_size, cfg.intermediate_size}
        assert all(w % 64 == 0 for w in widths), (folder, widths)


def test_repack_runs_on_every_4bit_layer_and_round_trips(tiny4):
    """bitsandbytes' repack (torch code, any CPU) accepts every layer and its inverse restores codes and absmax."""
    layers = four_bit_layers(tiny4)
    assert len(layers) == 2 * 6  # q, k, v, dense, fc1, fc2 in each of the 2 blocks
    for m in layers:
        w, qs = m.weight.data.clone(), m.weight.quant_state
        absmax = torch.clone(bnb.functional.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset)
        packed, state = _convert_weight_packed_for_cpu(w.clone(), qs)  # fails when in_features % 64 != 0
        assert state.packing_format_for_cpu and packed.shape == (qs.shape[0], qs.shape[1] // 2)
        torch.testing.assert_close(state.absmax.float().T.reshape(-1), absmax, rtol=1e-2, atol=0)  # bf16 absmax
        back, state = _convert_weight_packed_for_cpu_inverse(packed, state)
        assert torch.equal(back, w) and not state.packing_format_for_cpu


def test_branch_off_never_repacks(tiny4):
    """Without AVX-512 BF16 (or with it switched off), eval-mode inference leaves the 4-bit weights as they are."""
    set_branch(tiny4, False)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        out = tiny4.eval()(ids).logits
    assert quant.cpu_repacked_layers(tiny4) == [] and torch.isfinite(out).all()


def test_the_guard_keeps_the_branch_from_repacking(tiny4):
    """bench.eval_mode keeps 4-bit layers in train mode on a CPU: even with the branch on, nothing is repacked."""
    set_branch(tiny4, True)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad(), bench.eval_mode(tiny4):
        tiny4(ids)
        assert not any(m.training for m in tiny4.modules() if not quant.is_4bit_linear(m))  # dropout off
    assert quant.cpu_repacked_layers(tiny4) == []


def test_branch_on_repacks_then_computes_like_the_reference(tiny4):
    """With the branch on, an eval-mode no-grad forward repacks every layer; the bf16 kernel agrees to bf16 precision."""
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    set_branch(tiny4, False)
    with torch.no_grad():
        reference = tiny4.eval()(ids).logits
    set_branch(tiny4, True)
    if not HAS_AVX512BF16:
        for m in four_bit_layers(tiny4):  # what this CPU can run: the repack of every layer
            m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu(m.weight.data, m.weight.quant_state)
        assert len(quant.cpu_repacked_layers(tiny4)) == 12
        pytest.skip(NO_KERNEL)
    with torch.no_grad():
        repacked = tiny4.eval()(ids).logits
    assert len(quant.cpu_repacked_layers(tiny4)) == 12
    rel = (repacked - reference).norm() / reference.norm()
    assert 0 < rel < 0.02, rel  # another kernel (bf16 compute): not bit-identical, but the same function


def lora_b_gradients(model, guard: bool) -> dict[str, bool]:
    """LoRA (B starts at 0) on every Linear after one eval-mode no-grad forward (with or without the guard), then one
    training step: for each layer name, whether every lora_B got a non-zero gradient."""
    from peft import LoraConfig, get_peft_model

    set_branch(model, True)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        if guard:
            with bench.eval_mode(peft_model):
                peft_model(ids)
        else:
            peft_model.eval()(ids)  # e.g. generate() before training
    peft_model.train()
    peft_model(ids, labels=ids).loss.backward()
    got: dict[str, bool] = {}
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            leaf = name.split(".lora_B")[0].rsplit(".", 1)[-1]
            got[leaf] = got.get(leaf, True) and p.grad is not None and bool(p.grad.abs().sum() > 0)
    return got


@pytest.fixture
def tiny_llama4(tmp_path):
    """A tiny Llama (bias-free Linears, like SmolLM2) in NF4 on the CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    return models.load_model(str(tmp_path), quantization="nf4", dtype="float32", device="cpu")


def test_branch_on_after_repack_lora_gets_no_gradient(tiny_llama4):
    """The silent training bug: the packed kernel has no backward, so after a repacking forward every adapter whose
    gradient must cross a 4-bit layer (q/k/v through o_proj, gate/up through down_proj) gets none; o_proj/down_proj
    write into the residual stream and still learn, so the loss still falls. Through the guard, every adapter learns."""
    if not HAS_AVX512BF16:
        pytest.skip(NO_KERNEL)
    import copy

    guarded = lora_b_gradients(copy.deepcopy(tiny_llama4), guard=True)
    assert all(guarded.values()) and len(guarded) == 7, guarded
    bug = lora_b_gradients(tiny_llama4, guard=False)
    assert bug == {"q_proj": False, "k_proj": False, "v_proj": False, "o_proj": True,
                   "gate_proj": False, "up_proj": False, "down_proj": True}, bug


def test_branch_on_after_repack_biased_layers_cannot_train(tiny4):
    """With biases (Phi), training after a repacking forward does not even run: the packed path adds the bias in place."""
    if not HAS_AVX512BF16:
        pytest.skip(NO_KERNEL)
    with pytest.raises(RuntimeError, match="in-place operation"):
        lora_b_gradients(tiny4, guard=False)
