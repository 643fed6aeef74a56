"""helpers.models: registry, resolver, tiny Phi, offline SmolLM2 cache integrity, 4-bit loading."""

import json
import shutil

import pytest
import torch

from helpers import env, models


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(env.CACHE_ENV, str(tmp_path))
    return tmp_path


def test_registry_names_and_sources():
    assert set(models.REGISTRY) == {"phi-2", "smollm2-135m", "tiny-phi"}
    assert models.REGISTRY["phi-2"].hub_id == "microsoft/phi-2"
    assert models.model_path("phi-2") == "microsoft/phi-2"
    assert models.model_path("some-org/some-model") == "some-org/some-model"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_resolver_picks_offline_model_without_gpu(capsys):
    assert models.resolve_model("auto") == "smollm2-135m"
    assert "no CUDA GPU" in capsys.readouterr().out
    assert models.resolve_model("tiny-phi", verbose=False) == "tiny-phi"


def test_tiny_phi_has_phi2_structure_and_is_deterministic(tmp_cache):
    folder = models.build_tiny_phi()
    model = models.load_model(str(folder))
    cfg = model.config
    assert type(model).__name__ == "PhiForCausalLM"
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    rotary = int(head_dim * cfg.rope_parameters["partial_rotary_factor"])  # transformers 5: under rope_parameters
    assert (head_dim, rotary) == (128 // 4, int(32 * 0.4)) == (32, 12)  # hidden 128 (a multiple of 64), 4 heads, 0.4 rotary
    leaves = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert leaves == {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2", "lm_head"}
    assert model.lm_head.bias is not None and cfg.vocab_size % 64 == 0
    tok = models.load_tokenizer(str(folder))
    assert len(tok) <= cfg.vocab_size and tok.eos_token == "<|endoftext|>"
    first = {k: v.clone() for k, v in model.state_dict().items()}
    shutil.rmtree(folder)
    again = models.load_model(str(models.build_tiny_phi()))
    assert all(torch.equal(first[k], v) for k, v in again.state_dict().items())


def test_broken_cache_is_detected_and_rebuilt(tmp_cache):
    folder = models.build_tiny_phi()
    assert models.check_cache(folder, deep=True) == (True, "ok")
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as fh:
        fh.truncate(size - 1000)
    ok, why = models.check_cache(folder)
    assert not ok and "truncated" in why
    rebuilt = models.build_tiny_phi()
    assert rebuilt == folder and weights.stat().st_size == size and models.check_cache(folder)[0]


def test_corruption_with_same_size_is_caught_by_deep_check(tmp_cache):
    folder = models.build_tiny_phi()
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.seek(weights.stat().st_size - 8)
        fh.write(b"\x00" * 8)
    assert models.check_cache(folder)[0] is True  # sizes and header still fine
    ok, why = models.check_cache(folder, deep=True)
    assert not ok and "sha256" in why


def test_unfinished_build_has_no_manifest(tmp_cache):
    (tmp_cache / "tiny-phi").mkdir()
    ok, why = models.check_cache(tmp_cache / "tiny-phi")
    assert not ok and "never finished" in why


def test_stale_loading_kwargs_get_the_modern_replacement():
    for old, hint in [("load_in_4bit", "quantization='nf4'"), ("use_auth_token", "HF_TOKEN"), ("torch_dtype", "dtype=")]:
        with pytest.raises(TypeError, match=hint):
            models.load_model("tiny-phi", **{old: True})


def test_offline_hub_id_gives_actionable_error():
    with pytest.raises(models.ModelUnavailableError, match="smollm2-135m"):
        models.load_model("microsoft/phi-2")


@pytest.mark.slow
def test_tiny_phi_loads_in_nf4_and_int8():
    full = models.load_model("tiny-phi")
    nf4 = models.load_model("tiny-phi", quantization="nf4")
    int8 = models.load_model("tiny-phi", quantization="int8")
    names = {type(m).__name__ for m in nf4.modules()}
    assert "Linear4bit" in names and "Linear8bitLt" in {type(m).__name__ for m in int8.modules()}
    assert type(nf4.lm_head).__name__ == "Linear"  # the output head stays in full precision
    assert nf4.get_memory_footprint() < int8.get_memory_footprint() < full.get_memory_footprint()


@pytest.mark.slow
def test_smollm2_offline_model_is_ready_and_answers():
    folder = models.prepare_smollm2(verbose=False)
    manifest = json.loads((folder / models.MANIFEST).read_text())
    assert "Paris" in manifest["verify"]["answer"]
    model = models.load_model("smollm2-135m")
    n = sum(p.numel() for p in model.parameters())
    assert 134_000_000 < n < 135_000_000 and model.dtype == torch.float32
    tok = models.load_tokenizer("smollm2-135m")
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
