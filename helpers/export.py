"""Export: merge a LoRA adapter, convert to GGUF with llama.cpp's own converter, quantize, run with llama-cpp-python.

The converter (``convert_hf_to_gguf.py`` with its ``conversion/`` package and ``gguf-py``) ships inside the
``llama-cpp-python`` source distribution under ``vendor/llama.cpp/``. ``python -m helpers.export --prepare`` (run by
``make prepare`` while PyPI is reachable) downloads that sdist with pip and keeps only those files under
:func:`helpers.env.cache_dir`, so notebooks convert offline. Quantizing and running use the installed
``llama_cpp`` package (``llama_model_quantize``, ``Llama``). Also here: checks that the chat template, EOS and the
tokenizer travel with the GGUF, and an Ollama ``Modelfile`` writer with a renderer for the template subset it uses.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from helpers import data, env, evals, models

LLAMA_CPP_PYTHON = "0.3.36"  # the pinned llama-cpp-python: its sdist ships the converter, its wheel runs the files
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")
CONVERTER_IMPORTS = ("torch", "transformers", "numpy", "sentencepiece", "yaml", "requests", "tqdm")
PREPARE_HINT = "run `make prepare` (or `python -m helpers.export --prepare`) once while PyPI is reachable"
GGUF_MAGIC = b"GGUF"


class AdapterMismatchError(ValueError):
    """The adapter was trained on another base model than the one it is to be merged into."""


class GGUFFileError(ValueError):
    """A GGUF file is missing, truncated or not GGUF at all; the message names the file."""


class ConversionError(RuntimeError):
    """llama.cpp's converter failed; the message says why and what to do."""


# ------------------------------------------------------------------------------------- the converter


def converter_dir(version: str = LLAMA_CPP_PYTHON) -> Path:
    """Where `prepare_converter` keeps llama.cpp's converter files for `version` (under the course cache)."""
    return env.cache_dir() / f"llama.cpp-converter-{version}"


def find_converter(path: str | Path = "auto") -> Path:
    """The path of ``convert_hf_to_gguf.py`` ("auto": the prepared cache copy); raise with the fix if incomplete."""
    folder = converter_dir() if str(path) in ("", "auto") else Path(path)
    if folder.name == "convert_hf_to_gguf.py":
        folder = folder.parent
    missing = [p for p in CONVERTER_PARTS if not (folder / p).exists()]
    if missing:
        raise FileNotFoundError(f"llama.cpp's converter is not complete in {folder} (missing {missing}): {PREPARE_HINT}")
    return folder / "convert_hf_to_gguf.py"


def missing_converter_imports() -> list[str]:
    """Modules the converter imports that this Python lacks (sentencepiece is imported even for BPE tokenizers)."""
    return [m for m in CONVERTER_IMPORTS if importlib.util.find_spec(m) is None]


def _download_sdist(version: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(dest),
           f"llama-cpp-python=={version}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(f"llama_cpp_python-{version}.tar.gz"))
    if res.returncode != 0 or not found:
        raise RuntimeError(f"could not download the llama-cpp-python {version} sdist from PyPI (pip download said:\n"
                           f"{(res.stderr or res.stdout)[-1500:]})\nConnect to PyPI, or pass --sdist PATH to a local copy.")
    return found[0]


def prepare_converter(version: str = LLAMA_CPP_PYTHON, sdist: str | Path | None = None, verbose: bool = True) -> Path:
    """Extract llama.cpp's converter from the llama-cpp-python sdist (pip-downloaded unless `sdist` is given) once."""
    target = converter_dir(version)
    try:
        return find_converter(target).parent
    except FileNotFoundError:
        pass
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # extract aside, then move into place in one rename
        tmp = Path(tmp)
        src = Path(sdist) if sdist else _download_sdist(version, tmp / "dl")
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        out = tmp / "out"
        with tarfile.open(src) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix):].split("/")[0] in CONVERTER_PARTS and (m.isfile() or m.isdir())]
            if not members:
                raise RuntimeError(f"{src} has no {prefix}convert_hf_to_gguf.py: is it llama-cpp-python {version}'s sdist?")
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(out, members=members, filter="data")
        env.write_json(out / "slm_course_source.json", {"sdist": src.name, "version": version})
        if target.exists():  # an incomplete copy (or one another process finished meanwhile): replace it
            shutil.rmtree(target, ignore_errors=True)
        try:
            out.rename(target)
        except OSError:  # another process moved its complete copy in first
            find_converter(target)
    if verbose:
        print(f"llama.cpp converter (llama-cpp-python {version} sdist) ready at {target}")
    return target


# ------------------------------------------------------------------------------------- merging


def adapter_base(adapter_dir: str | Path) -> str:
    """The base model an adapter was trained on: train_config.json's "model", else adapter_config.json's base."""
    adapter_dir = Path(adapter_dir)
    cfg = adapter_dir / "train_config.json"
    if cfg.exists() and json.loads(cfg.read_text()).get("model"):
        return json.loads(cfg.read_text())["model"]
    acfg = adapter_dir / "adapter_config.json"
    if not acfg.exists():
        raise FileNotFoundError(f"no adapter_config.json in {adapter_dir}: not a PEFT adapter folder (notebook 04 saves one)")
    return json.loads(acfg.read_text())["base_model_name_or_path"]


def _same_model(a: str, b: str) -> bool:
    pa, pb = models.model_path(a), models.model_path(b)
    if Path(pa).exists() and Path(pb).exists():
        return Path(pa).resolve() == Path(pb).resolve()
    return pa == pb


def check_adapter_base(adapter_dir: str | Path, model: str) -> str:
    """Raise AdapterMismatchError (before any merging) unless the adapter was trained on `model`; return the base."""
    base = adapter_base(adapter_dir)
    if not _same_model(base, model):
        raise AdapterMismatchError(
            f"the adapter in {adapter_dir} was trained on {base!r}, not on {model!r}: merging it into another model "
            f"gives garbage (or fails on shapes). Merge it into {base!r} (MODEL='auto'), or use an adapter trained on {model!r}.")
    return base


def merge_adapter(adapter_dir: str | Path, model: str, out_dir: str | Path) -> Path:
    """Check the base, merge the adapter into the full-precision base (fp32), save model + tokenizer to `out_dir`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_adapter_base(adapter_dir, model)
    base = AutoModelForCausalLM.from_pretrained(models.model_path(model), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(out_dir)
    return Path(out_dir)


# ------------------------------------------------------------------------------------- converting


def byte_level_pre_tokenizer(model_dir: str | Path) -> str | None:
    """"gpt-2" if the folder's tokenizer.json pre-tokenizes exactly like GPT-2 (byte-level with its regex), else None."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.exists():
        return None
    pre = json.loads(path.read_text()).get("pre_tokenizer") or {}
    gpt2 = pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)
    return "gpt-2" if gpt2 else None


# runs llama.cpp's converter unchanged, after telling it the BPE pre-tokenizer it could not recognize by hash
_WITH_PRE = ("import runpy, sys; sys.path.insert(0, sys.argv[1]); import conversion.base as base; "
             "pre = sys.argv[2]; base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre; "
             "sys.argv = sys.argv[3:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def pre_tokenizer_for(model_dir: str | Path, converter: str | Path = "auto") -> str | None:
    """None if the converter knows the folder's BPE pre-tokenizer by its hash (or needs none), else a name to pass.

    Computes the hash the way convert_hf_to_gguf.py does (token ids of its own test string) and looks it up in the
    converter's source; an unknown GPT-2-style byte-level tokenizer gets "gpt-2" (see `byte_level_pre_tokenizer`).
    """
    import ast
    from hashlib import sha256

    from transformers import AutoTokenizer

    if not (Path(model_dir) / "tokenizer.json").exists():
        return None  # a SentencePiece model: no pre-tokenizer hash involved
    source = (find_converter(converter).parent / "conversion" / "base.py").read_text()
    found = re.search(r"^\s*chktxt = (.+)$", source, re.M)
    if not found:
        raise ConversionError("this converter version has no chktxt test string; pass pre_tokenizer yourself")
    ids = AutoTokenizer.from_pretrained(str(model_dir)).encode(ast.literal_eval(found.group(1)))
    known = sha256(str(ids).encode()).hexdigest() in source
    return None if known else byte_level_pre_tokenizer(model_dir)


def converter_command(model_dir: str | Path, outfile: str | Path, outtype: str = "f16", converter: str | Path = "auto",
                      pre_tokenizer: str | None = None, vocab_only: bool = False) -> list[str]:
    """The command line that runs llama.cpp's converter (optionally naming the BPE pre-tokenizer, see `convert`)."""
    script = find_converter(converter)
    args = [str(model_dir), "--outtype", outtype, "--outfile", str(outfile), *(["--vocab-only"] if vocab_only else [])]
    if pre_tokenizer is None:
        return [sys.executable, str(script), *args]
    return [sys.executable, "-c", _WITH_PRE, str(script.parent), pre_tokenizer, str(script), *args]


def convert(model_dir: str | Path, outfile: str | Path, outtype: str = "f16", converter: str | Path = "auto",
            pre_tokenizer: str | None = None, vocab_only: bool = False, timeout: float = 900) -> Path:
    """Convert a saved transformers folder to GGUF with llama.cpp's convert_hf_to_gguf.py; return the file.

    `vocab_only`: only the tokenizer, chat template and special tokens (a small file, for template checks).
    The converter recognizes a BPE tokenizer's pre-tokenizer by hashing the ids it gives a fixed test string; a
    vocabulary it has never seen (the course's tiny Phi) is refused. `pre_tokenizer` (e.g. "gpt-2", see
    `byte_level_pre_tokenizer`) tells it which one it is; the vocabulary and merges are converted as always.
    """
    missing = missing_converter_imports()
    if missing:
        raise ConversionError(f"llama.cpp's converter needs {missing}, which this Python lacks: pip install "
                              f"{' '.join(missing)} (make install does it)")
    outfile = Path(outfile)
    outfile.parent.mkdir(parents=True, exist_ok=True)
    cmd = converter_command(model_dir, outfile, outtype, converter, pre_tokenizer, vocab_only)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0 or not outfile.exists():
        log = (res.stderr or "") + (res.stdout or "")
        hint = ""
        if "pre-tokenizer was not recognized" in log:
            guess = byte_level_pre_tokenizer(model_dir)
            hint = ("\nThe converter identifies a BPE pre-tokenizer by the hash of the ids its vocabulary gives a test "
                    "string, and this vocabulary's hash is not in its list. "
                    + (f"tokenizer.json pre-tokenizes like GPT-2: pass pre_tokenizer={guess!r}." if guess else
                       "Find which pre-tokenizer the model uses and pass pre_tokenizer=<llama.cpp's name for it>."))
        raise ConversionError(f"convert_hf_to_gguf.py failed on {model_dir} (exit {res.returncode}):\n{log[-2500:]}{hint}")
    return outfile


# ------------------------------------------------------------------------------------- GGUF files


_KV_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF scalar value types → bytes
_STRING, _ARRAY = 8, 9


def _read_gguf_header(buf, path: Path) -> dict:
    """Walk a GGUF header (key/values, tensor table) without decoding the vocabulary; raise if it runs off the end."""
    import struct

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(buf):
            raise GGUFFileError(f"{path}: truncated GGUF: its header stops at byte {len(buf):,} (needs more). "
                                "Convert or quantize it again (or download it again).")
        pos += n
        return buf[pos - n:pos]

    def num(fmt: str):
        return struct.unpack("<" + fmt, take(struct.calcsize(fmt)))[0]

    def skip_value(vtype: int) -> None:
        if vtype == _STRING:
            take(num("Q"))
        elif vtype == _ARRAY:
            etype, count = num("I"), num("Q")
            if etype in _KV_SIZES:
                take(_KV_SIZES[etype] * count)
            else:
                for _ in range(count):
                    skip_value(etype)
        elif vtype in _KV_SIZES:
            take(_KV_SIZES[vtype])
        else:
            raise GGUFFileError(f"{path}: corrupt GGUF (unknown value type {vtype})")

    take(4)
    version, n_tensors, n_kv = num("I"), num("Q"), num("Q")
    keys, alignment = [], 32
    for _ in range(n_kv):
        key = take(num("Q")).decode("utf-8", "replace")
        vtype = num("I")
        if key == "general.alignment" and vtype == 4:
            alignment = num("I")
        else:
            skip_value(vtype)
        keys.append(key)
    tensors = []
    for _ in range(n_tensors):
        take(num("Q"))
        dims = [num("Q") for _ in range(num("I"))]
        ttype, offset = num("I"), num("Q")
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        n = math.prod(dims)
        tensors.append((GGMLQuantizationType(ttype).name, n, offset, n // block * size))
    data_start = -(-pos // alignment) * alignment
    return {"version": version, "keys": keys, "tensors": tensors, "data_start": data_start}


def check_gguf(path: str | Path) -> dict:
    """Read a GGUF file's header and tensor table; raise GGUFFileError naming the file if it is not complete.

    Returns {"path", "bytes", "tensors", "parameters", "tensor_bytes", "tensor_types", "metadata_keys"}.
    """
    import mmap

    path = Path(path)
    if not path.is_file():
        raise GGUFFileError(f"{path}: no such GGUF file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise GGUFFileError(f"{path}: not a GGUF file (starts with {magic!r}, not {GGUF_MAGIC!r})")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                head = _read_gguf_header(buf, path)
            except (ValueError, KeyError, UnicodeError) as e:
                if isinstance(e, GGUFFileError):
                    raise
                raise GGUFFileError(f"{path}: corrupt GGUF header ({e}). Convert or quantize it again.") from e
    tensors = head["tensors"]
    end = head["data_start"] + max(off + nb for _, _, off, nb in tensors) if tensors else 0  # vocab-only: no data
    if end > size:
        raise GGUFFileError(f"{path}: truncated GGUF: its tensors need {end:,} bytes, the file has {size:,}. "
                            "Convert or quantize it again (or download it again).")
    types: dict[str, int] = {}
    for name, *_ in tensors:
        types[name] = types.get(name, 0) + 1
    return {"path": str(path), "bytes": size, "tensors": len(tensors), "parameters": sum(t[1] for t in tensors),
            "tensor_bytes": sum(t[3] for t in tensors), "tensor_types": dict(sorted(types.items())),
            "metadata_keys": head["keys"]}


def tensor_types(path: str | Path) -> dict[str, int]:
    """How many tensors of each ggml type a GGUF holds (k-quants fall back to other types for some shapes)."""
    return check_gguf(path)["tensor_types"]


def quant_types() -> dict[str, int]:
    """llama.cpp's quantization types by name (Q8_0, Q4_K_M, ...) → the ftype number llama_model_quantize takes."""
    import llama_cpp

    prefix = "LLAMA_FTYPE_MOSTLY_"
    return {k[len(prefix):]: int(getattr(llama_cpp, k)) for k in dir(llama_cpp) if k.startswith(prefix)}


def quantize(src: str | Path, dst: str | Path, qtype: str = "Q4_K_M", threads: int = 0) -> Path:
    """Quantize a GGUF file with llama.cpp (llama_cpp.llama_model_quantize); `qtype` is a name from `quant_types()`."""
    import llama_cpp

    types = quant_types()
    if qtype.upper() not in types:
        raise ValueError(f"unknown quantization type {qtype!r}; valid: {', '.join(sorted(types))}")
    check_gguf(src)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = types[qtype.upper()]
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} → {dst}, {qtype}) failed with code {rc}")
    return Path(dst)


def load_gguf(path: str | Path, threads: int, n_ctx: int = 1024, **kwargs):
    """A `llama_cpp.Llama` on the CPU for a checked GGUF file, with `threads` threads for prompt and decode."""
    from llama_cpp import Llama

    check_gguf(path)
    return Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_gpu_layers=0,
                 verbose=False, **kwargs)


# ------------------------------------------------------------------------------------- generating with llama.cpp


def gguf_complete(llm, prompt: str | Sequence[int], max_new_tokens: int, ban_eos: bool = False) -> dict:
    """Greedy completion (temperature 0) from a fresh context: {"text", "finish_reason", "tokens"}."""
    llm.reset()  # no reuse of the previous prompt's KV cache: every call pays its own prefill
    bias = {llm.token_eos(): -1e9} if ban_eos else None
    out = llm.create_completion(prompt, max_tokens=max_new_tokens, temperature=0.0, logit_bias=bias)
    choice = out["choices"][0]
    return {"text": choice["text"], "finish_reason": choice["finish_reason"], "tokens": out["usage"]["completion_tokens"]}


def gguf_evaluate_task(llm, tokenizer, records: Sequence[Mapping], max_new_tokens: int = 48) -> dict:
    """`helpers.evals.evaluate_task` for a GGUF model: the same prompts (formatted by `tokenizer`), greedy, scored alike."""
    runs: list[dict] = []

    def complete(prompts: list[str]) -> list[str]:
        runs.extend(gguf_complete(llm, p, max_new_tokens) for p in prompts)
        return [r["text"].strip() for r in runs]

    result = evals.evaluate_task(None, tokenizer, records, generate_fn=complete)
    return {**result, "finish_reasons": [r["finish_reason"] for r in runs]}


def gguf_generation_speed(llm, prompts: Sequence[str] | str, max_new_tokens: int = 32, repeats: int = 1) -> dict:
    """`helpers.bench.generation_speed`'s numbers for a GGUF model, from one streamed greedy run per prompt.

    TTFT = time until the first streamed token (prefill + first step); decode tokens/s = the other tokens ÷ the
    time after it. EOS is banned so every run makes exactly `max_new_tokens` (transformers' min_new_tokens). No
    warm-up here: warm up on another prompt first. Returns prefill_tokens_per_s, decode_tokens_per_s, ttft_s,
    total_s, prompt_tokens, new_tokens, repeats, texts.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if max_new_tokens < 2:
        raise ValueError("max_new_tokens must be >= 2 to separate prefill from decoding")
    runs, texts = [], []
    for _ in range(max(1, repeats)):
        ttft = total = 0.0
        prompt_tokens = new_tokens = 0
        texts = []
        for p in prompts:
            llm.reset()
            t0 = time.perf_counter()
            first, pieces = None, []
            stream = llm.create_completion(p, max_tokens=max_new_tokens, temperature=0.0, stream=True,
                                           logit_bias={llm.token_eos(): -1e9})
            for chunk in stream:
                first = first or time.perf_counter()
                pieces.append(chunk["choices"][0]["text"])
            end = time.perf_counter()
            ttft, total = ttft + (first - t0), total + (end - t0)
            prompt_tokens += len(llm.tokenize(p.encode(), add_bos=False, special=True))
            new_tokens += max_new_tokens
            texts.append("".join(pieces))
        runs.append({"prefill_tokens_per_s": prompt_tokens / ttft,
                     "decode_tokens_per_s": (new_tokens - len(prompts)) / (total - ttft),
                     "ttft_s": ttft / len(prompts), "total_s": total})
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out.update(prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=len(runs), texts=texts)
    return out


# ------------------------------------------------------------------------------------- template and EOS


def gguf_chat_prompt(llm, messages: Sequence[Mapping]) -> str:
    """The prompt text the GGUF's embedded chat template gives (llama-cpp-python's Jinja2 formatter, as in chat)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise ValueError("this GGUF has no tokenizer.chat_template: the model's tokenizer had none when converted")
    eos, bos = llm.token_eos(), llm.token_bos()
    text = Jinja2ChatFormatter(template, eos_token=llm._model.token_get_text(eos) if eos >= 0 else "",
                               bos_token=llm._model.token_get_text(bos) if bos >= 0 else "")
    return text(messages=[dict(m) for m in messages]).prompt


def template_tokens_match(llm, tokenizer, conversations: Sequence[Sequence[Mapping]]) -> list[dict]:
    """For each conversation: the GGUF's template + llama.cpp's tokenizer vs tokenizer.apply_chat_template, by token id.

    A model without a chat template (Phi-2's Instruct/Output format) has none in the GGUF either: then the prompt
    text `helpers.data.format_prompt` builds is tokenized by both tokenizers instead.
    """
    rows = []
    chat = bool(getattr(tokenizer, "chat_template", None))
    for messages in conversations:
        if chat:
            ref = tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True, tokenize=True,
                                                return_dict=False)
            ref = list(ref["input_ids"] if isinstance(ref, Mapping) else ref)
            text = gguf_chat_prompt(llm, messages)
        else:
            if llm.metadata.get("tokenizer.chat_template"):
                raise ValueError("the GGUF has a chat template but the tokenizer has none: they do not belong together")
            text = data.format_prompt([dict(m) for m in messages], tokenizer)
            ref = tokenizer(text, add_special_tokens=False)["input_ids"]
        ours = llm.tokenize(text.encode(), add_bos=False, special=True)
        first = next((i for i, (a, b) in enumerate(zip(ref, ours, strict=False)) if a != b), min(len(ref), len(ours)))
        rows.append({"same": ref == ours, "template": "chat template in the GGUF" if chat else "Instruct/Output text",
                     "tokens": len(ref), "gguf_tokens": len(ours), "first_difference": None if ref == ours else first})
    return rows


def tokenizers_agree(llm, tokenizer, texts: Sequence[str]) -> bool:
    """True if llama.cpp's tokenizer (from the GGUF) gives the same ids as the transformers tokenizer on every text."""
    return all(llm.tokenize(t.encode(), add_bos=False, special=True) == tokenizer(t, add_special_tokens=False)["input_ids"]
               for t in texts)


# ------------------------------------------------------------------------------------- Ollama Modelfile

_GO_TAG = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def ollama_template(tokenizer, system: str | None = None) -> dict:
    """An Ollama TEMPLATE (Go template: .System, .Prompt) that renders the model's prompt format, up to the answer.

    ChatML templates (``<|im_start|>``, SmolLM2's) and Phi-2's ``Instruct:``/``Output:`` format are supported; other
    formats raise: write their TEMPLATE by hand (https://github.com/ollama/ollama/blob/main/docs/template.md).
    Returns {"template", "stop", "system"}: `system` is the system prompt the template puts in by default.
    """
    style = data.prompt_style(tokenizer)
    if style == "instruct":
        return {"template": "{{ if .System }}{{ .System }}\n{{ end }}Instruct: {{ .Prompt }}\nOutput:",
                "stop": [tokenizer.eos_token, "\nInstruct:"], "system": system}
    probe = data.format_prompt("PROBE", tokenizer)
    if "<|im_start|>" not in probe:
        raise NotImplementedError("only ChatML and Instruct/Output formats are translated to an Ollama TEMPLATE; "
                                  "write this model's TEMPLATE by hand (Ollama docs: docs/template.md)")
    default = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n", probe, re.S)
    template = ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
                "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n")
    return {"template": template, "stop": ["<|im_end|>", "<|im_start|>"],
            "system": system if system is not None else (default.group(1) if default else None)}


def render_go_template(template: str, **values: str) -> str:
    """Render the Go-template subset an Ollama TEMPLATE uses here: {{ .Name }}, {{ if .Name }}…{{ end }}, trim markers.

    Missing names render empty, as in Go templates; any other action raises ValueError.
    """
    out: list[str] = []
    stack: list[bool] = []  # one entry per open {{ if }}: is its branch on
    pos, trim_next = 0, False
    for m in _GO_TAG.finditer(template):
        trim_left, action, trim_right = m.groups()
        text = template[pos:m.start()]
        text = text.lstrip() if trim_next else text
        text = text.rstrip() if trim_left else text
        if all(stack):
            out.append(text)
        pos, trim_next = m.end(), bool(trim_right)
        if cond := re.fullmatch(r"if \.(\w+)", action):
            stack.append(bool(values.get(cond.group(1))))
        elif action == "end":
            if not stack:
                raise ValueError("{{ end }} without {{ if }}")
            stack.pop()
        elif re.fullmatch(r"\.\w+", action):
            if all(stack):
                out.append(str(values.get(action[1:]) or ""))
        else:
            raise ValueError(f"unsupported Go-template action {{{{ {action} }}}} (this renderer knows .Name, if, end)")
    if stack:
        raise ValueError("{{ if }} without {{ end }}")
    rest = template[pos:]
    return "".join(out) + (rest.lstrip() if trim_next else rest)


def write_modelfile(path: str | Path, gguf_file: str | Path, template: str, stop: Sequence[str],
                    system: str | None = None, parameters: Mapping[str, object] | None = None) -> Path:
    """Write an Ollama Modelfile: FROM (relative to the Modelfile), TEMPLATE, SYSTEM, one PARAMETER stop per string."""
    path = Path(path)
    source = os.path.relpath(Path(gguf_file).resolve(), path.parent.resolve())
    for name, text in (("TEMPLATE", template), ("SYSTEM", system or "")):
        if '"""' in text:
            raise ValueError(f"{name} contains triple quotes, which a Modelfile cannot hold")
    lines = [f"FROM ./{source}", f'TEMPLATE """{template}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stop if s]
    lines += [f"PARAMETER {k} {v}" for k, v in (parameters or {}).items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def read_modelfile(path: str | Path) -> dict:
    """Parse a Modelfile written by `write_modelfile`: {"FROM", "TEMPLATE", "SYSTEM", "stop": [...], "parameters"}."""
    text = Path(path).read_text()
    out: dict = {"stop": [], "parameters": {}}
    for m in re.finditer(r'^(FROM|TEMPLATE|SYSTEM|PARAMETER)[ \t]+("""(.*?)"""|[^\n]*)$', text, re.S | re.M):
        key, raw, quoted = m.group(1), m.group(2), m.group(3)
        value = quoted if quoted is not None else raw.strip()
        if key == "PARAMETER":
            name, _, v = value.partition(" ")
            if name == "stop":
                out["stop"].append(json.loads(v) if v.startswith('"') else v)
            else:
                out["parameters"][name] = v
        else:
            out[key] = value
    return out


def modelfile_prompt(modelfile: Mapping, messages: Sequence[Mapping]) -> str:
    """The prompt text Ollama would build from a parsed Modelfile for a system (optional) + one user message."""
    system = next((m["content"] for m in messages if m["role"] == "system"), modelfile.get("SYSTEM"))
    users = [m["content"] for m in messages if m["role"] == "user"]
    if len(users) != 1 or any(m["role"] not in ("system", "user") for m in messages):
        raise ValueError("modelfile_prompt renders one optional system message and exactly one user message")
    return render_go_template(modelfile["TEMPLATE"], System=system or "", Prompt=users[0])


if __name__ == "__main__":  # `python -m helpers.export --prepare [--sdist PATH]` (used by `make prepare`)
    import argparse

    ap = argparse.ArgumentParser(description="Prepare llama.cpp's converter in the course cache (offline use later).")
    ap.add_argument("--prepare", action="store_true", help="download the pinned sdist (pip) and extract the converter")
    ap.add_argument("--sdist", default=None, help="a local llama-cpp-python sdist instead of downloading it")
    ns = ap.parse_args()
    if ns.prepare:
        prepare_converter(sdist=ns.sdist)
        missing = missing_converter_imports()
        if missing:
            sys.exit(f"the converter also needs {missing}: pip install {' '.join(missing)}")
    else:
        ap.print_help()
