"""The chat template for Ollama: a Modelfile (FROM, TEMPLATE, SYSTEM, stop) and the prompt Ollama builds from it (08).

Ollama formats prompts with a Go template (https://github.com/ollama/ollama/blob/main/docs/template.md). The course
writes the classic form with ``.System``/``.Prompt``/``.Response`` — for ChatML the same as the non-``.Messages``
branch of Ollama's own ``template/chatml.gotmpl`` — and renders it the way Ollama's ``template.Execute`` does for
such a template: one pass per turn, the last one cut at ``{{ .Response }}``. `render_go_template` knows only the
Go-template subset used here and raises on anything else.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from helpers import data

_GO_TAG = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
CHATML = ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
          "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n{{ .Response }}<|im_end|>\n")
INSTRUCT = "{{ if .System }}{{ .System }}\n{{ end }}Instruct: {{ .Prompt }}\nOutput:{{ if .Response }} {{ .Response }}\n{{ end }}"


def template_for(tokenizer, system: str | None = None) -> dict:
    """An Ollama TEMPLATE for the model's prompt format: ChatML (``<|im_start|>``, SmolLM2's) or Phi-2's Instruct/Output.

    Other formats raise: write their TEMPLATE by hand (Ollama docs: docs/template.md). Returns {"template", "stop",
    "system"}: `system` is the system prompt the Modelfile sets by default (the chat template's own if not given).
    """
    if data.prompt_style(tokenizer) == "instruct":
        return {"template": INSTRUCT, "stop": [tokenizer.eos_token, "\nInstruct:"], "system": system}
    probe = data.format_prompt("PROBE", tokenizer)
    if "<|im_start|>" not in probe:
        raise NotImplementedError("only ChatML and Instruct/Output formats are translated to an Ollama TEMPLATE; "
                                  "write this model's TEMPLATE by hand (Ollama docs: docs/template.md)")
    default = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n", probe, re.S)
    return {"template": CHATML, "stop": ["<|im_end|>", "<|im_start|>"],
            "system": system if system is not None else (default.group(1) if default else None)}


def render_go_template(template: str, stop_at: str | None = None, **values: str) -> str:
    """Render the Go-template subset used here: {{ .Name }}, {{ if .Name }}…{{ end }}, trim markers ``{{-``/``-}}``.

    Missing names render empty, as in Go; `stop_at` ("Response") ends the text where that field stands, as Ollama
    does for the last turn. Any other action raises ValueError.
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
            if action[1:] == stop_at:
                return "".join(out)
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
    """The prompt Ollama builds from a parsed Modelfile for a chat (system, user and assistant messages).

    As Ollama's chat handler and ``template.Execute`` do for a template without ``.Messages``: the Modelfile's SYSTEM
    goes first unless the chat has a system message; each user turn (with the system before it and the answer
    after it) is one rendering of TEMPLATE; the last is cut at ``{{ .Response }}``, where the model takes over.
    """
    msgs = [dict(m) for m in messages]
    if modelfile.get("SYSTEM") and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": modelfile["SYSTEM"]})
    turns, turn = [], {"System": "", "Prompt": "", "Response": ""}
    for m in msgs:
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"modelfile_prompt renders system, user and assistant messages, not {m['role']!r}")
        opens = {"system": turn["Prompt"] or turn["Response"], "user": turn["Response"], "assistant": ""}[m["role"]]
        if opens:  # this message starts the next turn
            turns.append(turn)
            turn = {"System": "", "Prompt": "", "Response": ""}
        turn[{"system": "System", "user": "Prompt", "assistant": "Response"}[m["role"]]] = m["content"]
    text = "".join(render_go_template(modelfile["TEMPLATE"], **t) for t in turns)
    return text + render_go_template(modelfile["TEMPLATE"], stop_at="Response", **turn)
