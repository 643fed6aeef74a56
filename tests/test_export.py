"""helpers.export: converter preparation, adapter checks, conversion of the tiny Phi (its LoRA merged) with llama.cpp's
own converter, quantization, llama.cpp vs transformers logits, the chat template and EOS in the GGUF, the Ollama
Modelfile's template, and the three bad inputs (wrong base, truncated GGUF, unknown quantization type).

The converter runs as a subprocess (~10 s each); the GGUF files are built once per module.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from helpers import data, env, export, models

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
        with pytest.raises(export.GGUFFileError, match=str(tmp_path / name)):
            export.check_gguf(tmp_path / name)
        with pytest.raises(export.GGUFFileError, match=name):
            export.load_gguf(tmp_path / name, threads=1)
    (tmp_path / "x.gguf").write_text("not gguf")
    with pytest.raises(export.GGUFFileError, match="not a GGUF file"):
        export.check_gguf(tmp_path / "x.gguf")
    with pytest.raises(export.GGUFFileError, match="no such GGUF file"):
        export.check_gguf(tmp_path / "missing.gguf")


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
    info = export.check_gguf(tiny_gguf["f16"])
    n_params = sum(p.numel() for p in models.load_model(str(tiny_merged["merged"])).parameters())
    assert info["tensor_bytes"] < 4 * n_params and "tokenizer.ggml.pre" in info["metadata_keys"]
    assert export.tensor_types(tiny_gguf["f16"]).get("F16", 0) > 0
    tok = models.load_tokenizer(str(tiny_merged["merged"]))
    text = "the model reads a short sentence about small language models"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():  # the adapter model before merging: merge + conversion preserve what it computes
        ref = tiny_merged["model"](input_ids=torch.tensor([ids])).logits[0].double()
    llm = export.load_gguf(tiny_gguf["f16"], threads=1, n_ctx=256, logits_all=True)
    assert export.tokenizers_agree(llm, tok, [text, "Instruct: turn on the lamp\nOutput:", "x  y\n\nz 123"])
    llm.reset()
    llm.eval(ids)
    ours = torch.tensor(llm.scores[: len(ids)]).double()
    assert (ours - ref).abs().max() < 0.05 * ref.abs().max()  # f16 weights: close, not equal
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


def test_quantized_files_shrink_and_run(tiny_gguf):
    sizes = {k: Path(v).stat().st_size for k, v in tiny_gguf.items()}
    assert sizes["Q4_K_M"] < sizes["Q8_0"] < sizes["f16"]
    llm = export.load_gguf(tiny_gguf["Q4_K_M"], threads=1, n_ctx=256)
    export.gguf_complete(llm, "Instruct: warm up\nOutput:", 4)  # first-call costs out of the way
    speed = export.gguf_generation_speed(llm, ["Instruct: hello\nOutput:"], max_new_tokens=24)
    assert speed["new_tokens"] == 24 and speed["prefill_tokens_per_s"] > 0 and speed["decode_tokens_per_s"] > 0
    assert speed["total_s"] > speed["ttft_s"] > 0 and len(speed["texts"][0]) > 0


def test_generation_stops_at_the_eos_the_gguf_carries(tiny_merged, tmp_path):
    """A tiny Phi whose head always prefers EOS: llama.cpp must stop there (finish_reason 'stop'), not run to the limit."""
    model = models.load_model(str(tiny_merged["merged"]))
    with torch.no_grad():
        model.lm_head.bias[model.config.eos_token_id] = 1e3
    model.save_pretrained(tmp_path / "eos")
    models.load_tokenizer(str(tiny_merged["merged"])).save_pretrained(tmp_path / "eos")
    f16 = export.convert(tmp_path / "eos", tmp_path / "eos.gguf", pre_tokenizer="gpt-2")
    llm = export.load_gguf(f16, threads=1, n_ctx=256)
    assert llm.token_eos() == model.config.eos_token_id
    stopped = export.gguf_complete(llm, "Instruct: hello\nOutput:", 16)
    assert stopped["finish_reason"] == "stop" and stopped["tokens"] <= 1
    forced = export.gguf_complete(llm, "Instruct: hello\nOutput:", 5, ban_eos=True)
    assert forced["finish_reason"] == "length" and forced["tokens"] == 5


# ------------------------------------------------------------------------------------- chat template in the GGUF


@pytest.fixture(scope="module")
def smollm2_vocab(tmp_path_factory):
    """SmolLM2's tokenizer + chat template as a vocab-only GGUF (no weights: small and quick)."""
    out = export.convert(models.model_path("smollm2-135m"), tmp_path_factory.mktemp("vocab") / "smol-vocab.gguf",
                         vocab_only=True)
    return export.load_gguf(out, threads=1, vocab_only=True), models.load_tokenizer("smollm2-135m")


def test_gguf_chat_template_renders_the_course_prompts_token_for_token(smollm2_vocab):
    llm, tok = smollm2_vocab
    convs = heldout_conversations() + [[{"role": "user", "content": "What is the capital of France?"}],  # default system
                                       [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "lamp on"},
                                        {"role": "assistant", "content": '{"action":"on"}'},
                                        {"role": "user", "content": "and off again"}]]
    rows = export.template_tokens_match(llm, tok, convs)
    assert all(r["same"] for r in rows), rows
    assert llm.token_eos() == tok.eos_token_id and llm.metadata["tokenizer.chat_template"] == tok.chat_template
    answers = [data.split_record(r)[1] for r in data.read_rows(env.DATA_DIR / "sft" / "heldout.jsonl")[:20]]
    assert export.tokenizers_agree(llm, tok, answers)


def test_template_check_catches_a_wrong_template(smollm2_vocab, monkeypatch):
    llm, tok = smollm2_vocab
    monkeypatch.setitem(llm.metadata, "tokenizer.chat_template", tok.chat_template.replace("<|im_start|>assistant\n", "<|im_start|>assistant"))
    assert not export.template_tokens_match(llm, tok, heldout_conversations(1))[0]["same"]


# ------------------------------------------------------------------------------------- Ollama Modelfile


def test_modelfile_template_renders_the_same_prompt_text(tmp_path):
    tok = models.load_tokenizer("smollm2-135m")
    spec = export.ollama_template(tok, system=SYSTEM)
    (tmp_path / "model-Q4_K_M.gguf").write_bytes(b"GGUF")
    path = export.write_modelfile(tmp_path / "Modelfile", tmp_path / "model-Q4_K_M.gguf", spec["template"], spec["stop"],
                                  system=spec["system"], parameters={"temperature": 0})
    mf = export.read_modelfile(path)
    assert mf["FROM"] == "./model-Q4_K_M.gguf" and mf["stop"] == ["<|im_end|>", "<|im_start|>"]
    assert mf["SYSTEM"] == SYSTEM and mf["parameters"] == {"temperature": "0"}
    for conv in heldout_conversations():
        assert export.modelfile_prompt(mf, conv) == data.format_prompt(conv, tok)
        assert export.modelfile_prompt(mf, conv[1:]) == data.format_prompt(conv, tok)  # SYSTEM supplies the default
    plain = export.ollama_template(tok)  # no system given: the template's own default system prompt
    assert plain["system"].startswith("You are a helpful AI assistant named SmolLM")
    user = [{"role": "user", "content": "hi"}]
    assert export.render_go_template(plain["template"], System=plain["system"], Prompt="hi") == data.format_prompt(user, tok)


def test_modelfile_for_the_instruct_format_of_phi():
    tok = models.load_tokenizer("tiny-phi")
    spec = export.ollama_template(tok)
    assert spec["stop"][0] == "<|endoftext|>"
    assert export.render_go_template(spec["template"], Prompt="lamp on") == data.format_prompt("lamp on", tok)


def test_go_template_subset():
    t = "{{- if .System }}[{{ .System }}]\n{{- end }} {{ if .Prompt }}<{{ .Prompt }}>{{ end }}|{{ .Response }}"
    assert export.render_go_template(t, System="s", Prompt="p") == "[s] <p>|"
    assert export.render_go_template(t, Prompt="p", Response="r") == " <p>|r"
    assert export.render_go_template("{{ if .A }}a{{ if .B }}b{{ end }}{{ end }}.", A="1") == "a."
    assert export.render_go_template("a {{- .X -}} b", X="x") == "axb"
    with pytest.raises(ValueError, match="unsupported"):
        export.render_go_template("{{ range .Messages }}{{ end }}")
    with pytest.raises(ValueError, match="without"):
        export.render_go_template("{{ if .X }}open")
