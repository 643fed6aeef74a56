"""Export to GGUF: merge a LoRA adapter, convert with llama.cpp's own converter, quantize with llama.cpp (08).

The converter (``convert_hf_to_gguf.py`` with its ``conversion/`` package and ``gguf-py``) ships inside the
``llama-cpp-python`` source distribution under ``vendor/llama.cpp/``. ``python -m helpers.export --prepare`` (run by
``make prepare`` while PyPI is reachable) downloads that sdist with pip and keeps only those files under
:func:`helpers.env.cache_dir`, so notebooks convert offline. Quantizing uses the installed ``llama_cpp`` package
(``llama_model_quantize``, the library call behind the ``llama-quantize`` tool). Reading and checking the files:
``helpers.gguf_file``; running them: ``helpers.llamacpp``; the Ollama ``Modelfile``: ``helpers.ollama``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from helpers import env, models
from helpers.gguf_file import check_gguf

LLAMA_CPP_PYTHON = "0.3.36"  # the pinned llama-cpp-python: its sdist ships the converter, its wheel runs the files
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")
CONVERTER_IMPORTS = ("torch", "transformers", "numpy", "sentencepiece", "yaml", "requests", "tqdm")
PREPARE_HINT = "run `make prepare` (or `python -m helpers.export --prepare`) once while PyPI is reachable"


class AdapterMismatchError(ValueError):
    """The adapter was trained on another base model than the one it is to be merged into."""


class ConversionError(RuntimeError):
    """llama.cpp's converter failed; the message says why and what to do."""


# ------------------------------------------------------------------------------------- the converter


def converter_dir(version: str = LLAMA_CPP_PYTHON) -> Path:
    """Where `prepare_converter` keeps llama.cpp's converter files for `version` (under the course cache)."""
    return env.cache_dir() / f"llama.cpp-converter-{version}"


def find_converter(path: str | Path = "auto", pre_tokenizer: str | None = None) -> Path:
    """The path of ``convert_hf_to_gguf.py`` ("auto": the prepared cache copy; a folder; a script in it, kept as given).

    With `pre_tokenizer`: a wrapper script beside it that runs it unchanged after naming that BPE pre-tokenizer
    (see `convert`), called with the same arguments. Raises with the fix if the converter is incomplete.
    """
    given = Path(converter_dir() if str(path) in ("", "auto") else path)
    folder = given.parent if given.suffix == ".py" else given
    missing = [p for p in CONVERTER_PARTS if not (folder / p).exists()]
    if missing:
        raise FileNotFoundError(f"llama.cpp's converter is not complete in {folder} (missing {missing}): {PREPARE_HINT}")
    script = given if given.suffix == ".py" and given.is_file() else folder / "convert_hf_to_gguf.py"
    return script if pre_tokenizer is None else _pre_tokenizer_wrapper(folder, pre_tokenizer)


# llama.cpp's converter, unchanged, told the BPE pre-tokenizer it could not recognize by hash
_WRAPPER = '''"""llama.cpp's convert_hf_to_gguf.py run unchanged, told the BPE pre-tokenizer is {pre!r} (written by helpers.export).

It recognizes a BPE vocabulary's pre-tokenizer by the hash of the ids it gives a test string and refuses one it
has never seen; this names it instead. Arguments: those of convert_hf_to_gguf.py.
"""
import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import conversion.base as base  # noqa: E402

base.TextModel.get_vocab_base_pre = lambda self, tokenizer: {pre!r}
sys.argv[0] = str(HERE / "convert_hf_to_gguf.py")
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def _pre_tokenizer_wrapper(folder: Path, pre_tokenizer: str) -> Path:
    """Write (once, atomically) the wrapper that names `pre_tokenizer` to the converter in `folder`; return it."""
    if not re.fullmatch(r"[\w.+-]+", pre_tokenizer):
        raise ValueError(f"pre_tokenizer must be one of llama.cpp's pre-tokenizer names (e.g. 'gpt-2'), got {pre_tokenizer!r}")
    path = folder / f"convert_hf_to_gguf_pre_{pre_tokenizer}.py"
    text = _WRAPPER.format(pre=pre_tokenizer)
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(text)
        tmp.replace(path)
    return path


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
    """``python convert_hf_to_gguf.py MODEL_DIR --outfile OUTFILE --outtype OUTTYPE`` (the converter from `find_converter`)."""
    script = find_converter(converter, pre_tokenizer)
    return [sys.executable, str(script), str(model_dir), "--outfile", str(outfile), "--outtype", outtype,
            *(["--vocab-only"] if vocab_only else [])]


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


# ------------------------------------------------------------------------------------- quantizing


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
