"""helpers.ollama: the Modelfile and the prompt Ollama builds from its TEMPLATE, checked against two oracles the course
did not write: Ollama's own expected renderings of ChatML (its repository's template/testdata/chatml.gotmpl/*) and
transformers' `apply_chat_template` for the same messages, token for token.
"""

from __future__ import annotations

import pytest

from helpers import data, env, models, ollama

SYSTEM = "Reply with JSON only: action (on/off/set), device, room, value (number or null), time (HH:MM or null)."

# Ollama's expected prompts for its ChatML template, copied from github.com/ollama/ollama, template/testdata/chatml.gotmpl/
OLLAMA_CHATML_USER = "<|im_start|>user\nHello, how are you?<|im_end|>\n<|im_start|>assistant\n"
OLLAMA_CHATML_SYSTEM_USER_ASSISTANT_USER = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello, how are you?<|im_end|>\n"
    "<|im_start|>assistant\nI'm doing great. How can I help you today?<|im_end|>\n<|im_start|>user\n"
    "I'd like to show off how chat templating works!<|im_end|>\n<|im_start|>assistant\n")
OLLAMA_CHAT = [{"role": "system", "content": "You are a helpful assistant."},
               {"role": "user", "content": "Hello, how are you?"},
               {"role": "assistant", "content": "I'm doing great. How can I help you today?"},
               {"role": "user", "content": "I'd like to show off how chat templating works!"}]


@pytest.fixture(scope="module")
def smol():
    return models.load_tokenizer("smollm2-135m")


@pytest.fixture
def modelfile(smol, tmp_path):
    spec = ollama.template_for(smol, system=SYSTEM)
    (tmp_path / "model-Q4_K_M.gguf").write_bytes(b"GGUF")
    path = ollama.write_modelfile(tmp_path / "Modelfile", tmp_path / "model-Q4_K_M.gguf", spec["template"], spec["stop"],
                                  system=spec["system"], parameters={"temperature": 0})
    return ollama.read_modelfile(path)


def test_the_chatml_template_renders_what_ollama_expects(modelfile):
    no_system = {**modelfile, "SYSTEM": None}
    assert ollama.modelfile_prompt(no_system, OLLAMA_CHAT[1:2]) == OLLAMA_CHATML_USER
    assert ollama.modelfile_prompt(no_system, OLLAMA_CHAT) == OLLAMA_CHATML_SYSTEM_USER_ASSISTANT_USER
    # the Modelfile's SYSTEM stands in for a missing system message, and only then
    assert ollama.modelfile_prompt(modelfile, OLLAMA_CHAT[1:]) == OLLAMA_CHATML_SYSTEM_USER_ASSISTANT_USER.replace(
        "You are a helpful assistant.", SYSTEM)
    assert ollama.modelfile_prompt(modelfile, OLLAMA_CHAT) == OLLAMA_CHATML_SYSTEM_USER_ASSISTANT_USER


def test_the_modelfile_prompt_is_smollm2s_chat_template_token_for_token(modelfile, smol):
    rows = data.read_rows(env.DATA_DIR / "sft" / "heldout.jsonl")[:6]
    chats = [data.split_record(r)[0] for r in rows]
    chats += [[*c, {"role": "assistant", "content": data.split_record(r)[1]}, {"role": "user", "content": "and off again"}]
              for c, r in zip(chats[:2], rows, strict=False)]  # two turns: the first answer stays in the prompt
    compared = 0
    for chat in chats:
        expected = smol.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        for sent in (chat, [m for m in chat if m["role"] != "system"]):  # with the system message, or the Modelfile's
            got = smol(ollama.modelfile_prompt(modelfile, sent), add_special_tokens=False)["input_ids"]
            assert got == list(expected), (chat, got[:20], expected[:20])
            compared += 1
    assert compared == 16


def test_the_modelfile_holds_what_ollama_reads(modelfile, smol):
    assert modelfile["FROM"] == "./model-Q4_K_M.gguf" and modelfile["stop"] == ["<|im_end|>", "<|im_start|>"]
    assert modelfile["SYSTEM"] == SYSTEM and modelfile["parameters"] == {"temperature": "0"}
    assert smol.convert_tokens_to_ids("<|im_end|>") == smol.eos_token_id  # the stop string is the model's EOS
    plain = ollama.template_for(smol)  # no system given: SmolLM2's own default system prompt
    assert plain["system"].startswith("You are a helpful AI assistant named SmolLM")


def test_modelfile_for_the_instruct_format_of_phi():
    tok = models.load_tokenizer("tiny-phi")
    spec = ollama.template_for(tok, system="Be brief.")
    mf = {"TEMPLATE": spec["template"], "SYSTEM": spec["system"]}
    assert spec["stop"][0] == "<|endoftext|>" == tok.eos_token
    # Phi-2's documented format (its model card): "Instruct: <prompt>\nOutput:"
    assert ollama.modelfile_prompt({"TEMPLATE": spec["template"]}, [{"role": "user", "content": "lamp on"}]) == \
        "Instruct: lamp on\nOutput:"
    assert ollama.modelfile_prompt(mf, [{"role": "user", "content": "lamp on"}, {"role": "assistant", "content": "ok"},
                                        {"role": "user", "content": "off"}]) == \
        "Be brief.\nInstruct: lamp on\nOutput: ok\nInstruct: off\nOutput:"


def test_go_template_subset():
    # expected strings worked out by hand from Go's text/template rules (pkg.go.dev/text/template: trim markers, if)
    t = "{{- if .System }}[{{ .System }}]\n{{- end }} {{ if .Prompt }}<{{ .Prompt }}>{{ end }}|{{ .Response }}"
    assert ollama.render_go_template(t, System="s", Prompt="p") == "[s] <p>|"
    assert ollama.render_go_template(t, Prompt="p", Response="r") == " <p>|r"
    assert ollama.render_go_template(t, stop_at="Response", Prompt="p", Response="r") == " <p>|"
    assert ollama.render_go_template("{{ if .A }}a{{ if .B }}b{{ end }}{{ end }}.", A="1") == "a."
    assert ollama.render_go_template("a {{- .X -}} b", X="x") == "axb"
    with pytest.raises(ValueError, match="unsupported"):
        ollama.render_go_template("{{ range .Messages }}{{ end }}")
    with pytest.raises(ValueError, match="without"):
        ollama.render_go_template("{{ if .X }}open")
    with pytest.raises(ValueError, match="triple quotes"):
        ollama.write_modelfile("/nonexistent/Modelfile", "m.gguf", 'say """hi"""', [])
