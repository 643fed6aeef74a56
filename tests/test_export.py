"""The GGUF route, on files built once here: helpers.export (converter preparation, adapter checks, conversion of the
tiny Phi with its LoRA merged by llama.cpp's own converter, quantization), helpers.gguf_file (file checks),
helpers.llamacpp (llama.cpp vs transformers logits, speed, the chat template and EOS in the GGUF) and the command-line
route notebook 09 prints (the converter command, llama-cpp-python's OpenAI-compatible server). The Ollama Modelfile
needs no GGUF: tests/test_ollama.py.

The converter runs as a subprocess (~10 s each); the GGUF files are built once per module.
"""

from __future__ import annotations

import importlib.util
import io
import json
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from helpers import data, env, export, gguf_file, llamacpp, models

SYSTEM = "Reply with JSON only: action (on/off/set), device, room, value (number or null), time (HH:MM or null)."


def heldout_conversations(n: int = 6) -> list[list[dict]]:
    """The course's prompts: the first held-out requests, without their answers."""
    return [data.split_record(r)[0] for r in data.read_rows(env.DATA_DIR / "sft" / "heldout.jsonl")[:n]]


# ------------------------------------------------------------------------------------- converter preparation


def fake_sdist(path: Path, version: str) -> Path:
    """A stand-in llama-cpp-python sdist: the converter's parts under vendor/llama.cpp/ plus files we must not keep."""
    files = {"convert_hf_to_gguf.py": "print('converter')\n", "conversion/__init__.py": "", "conversion/base.py": "",
             "gguf-py/gguf/__init__.py": "", "LICENSE": "MIT\n", "ggml/src/big.c": "int x;\n", "README.md": "no\n"}
    with tarfile.open(path, "w:gz") as tar:
        for name, text in {**{f"vendor/llama.cpp/{k}": v for k, v in files.items()}, "setup.py": ""}.items():
            raw = text.encode()
            info = tarfile.TarInfo(f"llama_cpp_python-{version}/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def test_prepare_converter_keeps_only_the_converter(tmp_path, monkeypatch):
    monkeypatch.setenv(env.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="make prepare"):
        export.find_converter()
    folder = export.prepare_converter("9.9.9", sdist=fake_sdist(tmp_path / "sd.tar.gz", "9.9.9"), verbose=False)
    assert folder == export.converter_dir("9.9.9")
    assert sorted(p.name for p in folder.iterdir()) == sorted([*export.CONVERTER_PARTS, "slm_course_source.json"])
    assert (folder / "gguf-py" / "gguf" / "__init__.py").exists() and not (folder / "ggml").exists()
    # idempotent: a second call reuses the folder without reading the sdist
    assert export.prepare_converter("9.9.9", sdist=tmp_path / "absent.tar.gz", verbose=False) == folder


def test_prepared_converter_and_its_imports_are_here():
    script = export.find_converter()  # make prepare extracted it
    assert script.name == "convert_hf_to_gguf.py" and (script.parent / "conversion" / "phi.py").exists()
    assert export.missing_converter_imports() == []


# ------------------------------------------------------------------------------------- bad input


def test_adapter_of_another_base_is_refused_before_merging(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "some/other-model"}))
    (adapter / "train_config.json").write_text(json.dumps({"model": "tiny-phi"}))
    assert export.adapter_base(adapter) == "tiny-phi"
    with pytest.raises(export.AdapterMismatchError, match=r"trained on 'tiny-phi', not on 'smollm2-135m'"):
        export.merge_adapter(adapter, "smollm2-135m", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()  # refused before loading or writing anything
    assert export.check_adapter_base(adapter, models.model_path("tiny-phi")) == "tiny-phi"  # name or folder: same model


def test_truncated_or_foreign_gguf_names_the_file(tiny_gguf, tmp_path):
    whole = tiny_gguf["f16"].read_bytes()
    for name, raw in (("cut.gguf", whole[: len(whole) // 2]), ("header.gguf", whole[:64]), ("empty.gguf", b"")):
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(gguf_file.GGUFFileError, match=str(tmp_path / name)):
            gguf_file.check_gguf(tmp_path / name)
        with pytest.raises(gguf_file.GGUFFileError, match=name):
            llamacpp.load_gguf(tmp_path / name, threads=1)
    (tmp_path / "x.gguf").write_text("not gguf")
    with pytest.raises(gguf_file.GGUFFileError, match="not a GGUF file"):
        gguf_file.check_gguf(tmp_path / "x.gguf")
    with pytest.raises(gguf_file.GGUFFileError, match="no such GGUF file"):
        gguf_file.check_gguf(tmp_path / "missing.gguf")


def test_unknown_quantization_type_lists_the_valid_ones(tiny_gguf, tmp_path):
    with pytest.raises(ValueError, match=r"unknown quantization type 'Q3_X'.*Q4_K_M.*Q8_0"):
        export.quantize(tiny_gguf["f16"], tmp_path / "q.gguf", "Q3_X")
    assert {"Q8_0", "Q4_K_M", "Q4_0", "F16"} <= set(export.quant_types())


# ------------------------------------------------------------------------------------- the tiny Phi, end to end


@pytest.fixture(scope="module")
def tiny_merged(tmp_path_factory):
    """The tiny Phi with a random (non-zero) LoRA adapter saved, then merged into it by export.merge_adapter."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    base = models.load_model("tiny-phi", dtype="float32")
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    peft_model.save_pretrained(root / "adapter")
    models.load_tokenizer("tiny-phi").save_pretrained(root / "adapter")
    (root / "adapter" / "train_config.json").write_text(json.dumps({"model": "tiny-phi"}))
    merged = export.merge_adapter(root / "adapter", "tiny-phi", root / "merged")
    return {"root": root, "merged": merged, "model": peft_model.eval()}


@pytest.fixture(scope="module")
def tiny_gguf(tiny_merged):
    """The merged tiny Phi as GGUF f16 (llama.cpp's converter, told the pre-tokenizer) and quantized Q8_0 / Q4_K_M."""
    root, merged = tiny_merged["root"], tiny_merged["merged"]
    with pytest.raises(export.ConversionError, match="pre_tokenizer='gpt-2'"):  # why the tiny Phi needs the name
        export.convert(merged, root / "refused.gguf")
    pre = export.byte_level_pre_tokenizer(merged)
    assert pre == "gpt-2"
    files = {"f16": export.convert(merged, root / "tiny-f16.gguf", pre_tokenizer=pre)}
    for q in ("Q8_0", "Q4_K_M"):
        files[q] = export.quantize(files["f16"], root / f"tiny-{q}.gguf", q)
    return files


def test_tiny_phi_converts_with_merged_lora_and_matches_transformers(tiny_merged, tiny_gguf):
    info = gguf_file.check_gguf(tiny_gguf["f16"])
    merged = models.load_model(str(tiny_merged["merged"]))
    n_params = sum(p.numel() for p in merged.parameters())
    # every weight is in the file once: f16 matrices (2 bytes), f32 norms and biases (4), so between 2 and 4 bytes each
    assert info["parameters"] == n_params and 2 * n_params < info["tensor_bytes"] < 4 * n_params
    assert "tokenizer.ggml.pre" in info["metadata_keys"] and gguf_file.tensor_types(tiny_gguf["f16"]).get("F16", 0) > 0
    tok = models.load_tokenizer(str(tiny_merged["merged"]))
    text = "the model reads a short sentence about small language models"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():  # the adapter model before merging: merge + conversion preserve what it computes
        ref = tiny_merged["model"](input_ids=torch.tensor([ids])).logits[0].double()
    llm = llamacpp.load_gguf(tiny_gguf["f16"], threads=1, n_ctx=256, logits_all=True)
    assert llamacpp.tokenizers_agree(llm, tok, [text, "Instruct: turn on the lamp\nOutput:", "x  y\n\nz 123"])
    llm.reset()
    llm.eval(ids)
    ours = torch.tensor(llm.scores[: len(ids)]).double()
    assert (ours - ref).abs().max() < 0.05 * ref.abs().max()  # f16 weights: close, not equal
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


def test_quantized_files_shrink_and_run(tiny_gguf):
    sizes = {k: Path(v).stat().st_size for k, v in tiny_gguf.items()}
    assert sizes["Q4_K_M"] < sizes["Q8_0"] < sizes["f16"]
    info = {k: gguf_file.check_gguf(v) for k, v in tiny_gguf.items()}
    assert all(i["tensors"] == info["f16"]["tensors"] and i["bytes"] == sizes[k] for k, i in info.items())
    assert "Q8_0" in info["Q8_0"]["tensor_types"]  # quantized, not copied
    llm = llamacpp.load_gguf(tiny_gguf["Q4_K_M"], threads=1, n_ctx=256)
    speed = llamacpp.generation_speed(llm, ["Instruct: hello\nOutput:"], max_new_tokens=24, warmup=1, repeats=2)
    assert speed["new_tokens"] == 24 and speed["repeats"] == 2 and speed["prompt_tokens"] == len(
        llm.tokenize(b"Instruct: hello\nOutput:", add_bos=True, special=True))
    assert speed["prefill_tokens_per_s"] > 0 and speed["decode_tokens_per_s"] > 0 and speed["total_s"] > speed["ttft_s"] > 0
    # the timed text is the greedy completion (EOS held off), not something else
    assert speed["texts"][0] == llamacpp.complete(llm, "Instruct: hello\nOutput:", 24, ban_eos=True)["text"]


def test_generation_stops_at_the_eos_the_gguf_carries(tiny_merged, tmp_path):
    """A tiny Phi whose head always prefers EOS: llama.cpp must stop there (finish_reason 'stop'), not run to the limit."""
    model = models.load_model(str(tiny_merged["merged"]))
    with torch.no_grad():
        model.lm_head.bias[model.config.eos_token_id] = 1e3
    model.save_pretrained(tmp_path / "eos")
    models.load_tokenizer(str(tiny_merged["merged"])).save_pretrained(tmp_path / "eos")
    f16 = export.convert(tmp_path / "eos", tmp_path / "eos.gguf", pre_tokenizer="gpt-2")
    llm = llamacpp.load_gguf(f16, threads=1, n_ctx=256)
    assert llm.token_eos() == model.config.eos_token_id
    stopped = llamacpp.complete(llm, "Instruct: hello\nOutput:", 16)
    assert stopped["finish_reason"] == "stop" and stopped["tokens"] <= 1
    forced = llamacpp.complete(llm, "Instruct: hello\nOutput:", 5, ban_eos=True)
    assert forced["finish_reason"] == "length" and forced["tokens"] == 5


# ------------------------------------------------------------------------------------- chat template in the GGUF


@pytest.fixture(scope="module")
def smollm2_vocab(tmp_path_factory):
    """SmolLM2's tokenizer + chat template as a vocab-only GGUF (no weights: small and quick)."""
    out = export.convert(models.model_path("smollm2-135m"), tmp_path_factory.mktemp("vocab") / "smol-vocab.gguf",
                         vocab_only=True)
    return llamacpp.load_gguf(out, threads=1, vocab_only=True), models.load_tokenizer("smollm2-135m")


def test_gguf_chat_template_renders_the_course_prompts_token_for_token(smollm2_vocab):
    llm, tok = smollm2_vocab
    convs = heldout_conversations() + [[{"role": "user", "content": "What is the capital of France?"}],  # default system
                                       [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "lamp on"},
                                        {"role": "assistant", "content": '{"action":"on"}'},
                                        {"role": "user", "content": "and off again"}]]
    rows = llamacpp.template_tokens_match(llm, tok, convs)
    assert all(r["same"] for r in rows), rows
    assert llm.token_eos() == tok.eos_token_id and llm.metadata["tokenizer.chat_template"] == tok.chat_template
    answers = [data.split_record(r)[1] for r in data.read_rows(env.DATA_DIR / "sft" / "heldout.jsonl")[:20]]
    assert llamacpp.tokenizers_agree(llm, tok, answers)


def test_template_check_catches_a_wrong_template(smollm2_vocab, monkeypatch):
    llm, tok = smollm2_vocab
    monkeypatch.setitem(llm.metadata, "tokenizer.chat_template", tok.chat_template.replace("<|im_start|>assistant\n", "<|im_start|>assistant"))
    assert not llamacpp.template_tokens_match(llm, tok, heldout_conversations(1))[0]["same"]


# ------------------------------------------------------------------------------------- the command-line route (08)


def test_the_converter_command_is_the_one_a_reader_types(tiny_merged, tmp_path):
    """`python convert_hf_to_gguf.py <merged> --outfile model-f16.gguf --outtype f16`, run as a shell command."""
    script = export.find_converter()
    assert export.converter_command("m", "model-f16.gguf") == [sys.executable, str(script), "m", "--outfile",
                                                               "model-f16.gguf", "--outtype", "f16"]
    wrapper = export.find_converter(pre_tokenizer="gpt-2")  # the tiny Phi's vocabulary needs its pre-tokenizer named
    assert wrapper.parent == script.parent and export.find_converter(wrapper) == wrapper
    cmd = f"{sys.executable} {wrapper} {tiny_merged['merged']} --outfile model-f16.gguf --outtype f16"
    res = subprocess.run(cmd, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert gguf_file.check_gguf(tmp_path / "model-f16.gguf")["tensor_types"].get("F16", 0) > 0
    with pytest.raises(ValueError, match="pre-tokenizer names"):
        export.find_converter(pre_tokenizer="gpt-2; rm -rf /")


SERVER_PACKAGES = ("openai", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")
SERVER_INSTALL = "pip install 'llama-cpp-python[server]==0.3.36' openai==3.57.0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_compatible_server_answers_like_the_library(tiny_gguf, tmp_path):
    """`python -m llama_cpp.server --model model-Q8_0.gguf` (llama-server's counterpart) queried by the openai client."""
    missing = [m for m in SERVER_PACKAGES if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"the server route needs {missing}: {SERVER_INSTALL}")
    from openai import OpenAI

    port, model = free_port(), tiny_gguf["Q8_0"]
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
                             "--port", str(port), "--n_threads", "1", "--n_ctx", "256"],
                            stdout=subprocess.DEVNULL, stderr=(tmp_path / "server.log").open("w"))
    try:
        for _ in range(240):  # up to 2 minutes on a loaded machine
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
                time.sleep(0.5)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        prompt = "Instruct: turn on the lamp\nOutput:"
        # greedy; the server's default repeat penalty (1.1) would change the tokens, so it is switched off
        got = client.completions.create(model=model.name, prompt=prompt, max_tokens=8, temperature=0,
                                        extra_body={"repeat_penalty": 1.0})
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    expected = llamacpp.complete(llamacpp.load_gguf(model, threads=1, n_ctx=256), prompt, 8)
    assert got.choices[0].text == expected["text"] and got.usage.completion_tokens == expected["tokens"]
