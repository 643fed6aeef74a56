"""SFT data: load + validate the formats people have, format them for a model, the course's synthetic task.

Accepted files (``.json`` = one JSON array of objects, or JSON lines; ``.jsonl`` = one object per line):

- ``{"text": ...}``                       the seed's format: plain text, loss on every token
- ``{"prompt": ..., "completion": ...}``  loss on the completion only
- ``{"instruction": ..., "response": ...}`` (optional ``"input"``/``"context"``) → normalised to prompt/completion
- ``{"messages": [{"role": ..., "content": ...}, ...]}`` chat; the last message is the assistant's answer

Anything else stops at load time with a :class:`DataFormatError` that names the file, the row and the field.

Formatting: the tokenizer's chat template where it has one, else Phi-2's documented ``Instruct: …\\nOutput:``
format; every completion ends with the EOS token so that the model learns to stop.

The task (``make_task_records``): free-text smart-home requests → one fixed JSON schema, seeded; the held-out
split uses (device, room) combinations that never occur in training. ``parse_prediction`` /
``score_predictions`` score generations against it (notebooks 04 and 05).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

# ------------------------------------------------------------------------------------------- loading


class DataFormatError(ValueError):
    """A training file is unusable; the message names the file, the row (1-based) and the field."""

    def __init__(self, path: str | Path, row: int | None, field: str | None, problem: str):
        self.path, self.row, self.field, self.problem = str(path), row, field, problem
        where = str(path)
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {problem}")


FORMATS = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "instruction_response": ("instruction", "response"),
    "messages": ("messages",),
}
ROLES = ("system", "user", "assistant")


def _detect_format(path: Path, row: int, obj: dict) -> str:
    """Which accepted format a row is in, from its keys (raises if none fits)."""
    keys = set(obj)
    for name, fields in (("messages", ("messages",)), ("prompt_completion", ("prompt", "completion")),
                         ("instruction_response", ("instruction", "response")), ("text", ("text",))):
        present = [f for f in fields if f in keys]
        if len(present) == len(fields):
            return name
        if present:  # half of a pair: name the missing half
            missing = next(f for f in fields if f not in keys)
            raise DataFormatError(path, row, missing, f"missing (the row has {present[0]!r}, so it needs {missing!r} too)")
    accepted = " | ".join("{" + ", ".join(map(repr, f)) + "}" for f in FORMATS.values())
    raise DataFormatError(path, row, None, f"no known fields in keys {sorted(keys)}; accepted formats: {accepted}")


def _string(path: Path, row: int, field: str, value) -> str:
    if not isinstance(value, str):
        raise DataFormatError(path, row, field, f"expected a string, got {type(value).__name__} ({str(value)[:40]!r})")
    if not value.strip():
        raise DataFormatError(path, row, field, "empty string")
    return value


def _normalise(path: Path, row: int, obj: dict, fmt: str) -> dict:
    """One validated row in the canonical columns of its format."""
    if fmt == "text":
        return {"text": _string(path, row, "text", obj["text"])}
    if fmt == "prompt_completion":
        return {"prompt": _string(path, row, "prompt", obj["prompt"]),
                "completion": _string(path, row, "completion", obj["completion"])}
    if fmt == "instruction_response":
        prompt = _string(path, row, "instruction", obj["instruction"])
        for extra in ("input", "context"):  # Alpaca's "input", Dolly's "context": optional, may be empty
            if obj.get(extra) not in (None, ""):
                prompt += "\n\n" + _string(path, row, extra, obj[extra])
        return {"prompt": prompt, "completion": _string(path, row, "response", obj["response"])}
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(path, row, "messages", f"expected a non-empty list of messages, got {type(messages).__name__}")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataFormatError(path, row, f"messages[{i}]", f"expected an object, got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise DataFormatError(path, row, f"messages[{i}].{key}", "missing")
        if m["role"] not in ROLES:
            raise DataFormatError(path, row, f"messages[{i}].role", f"{m['role']!r} is not one of {ROLES}")
        clean.append({"role": m["role"], "content": _string(path, row, f"messages[{i}].content", m["content"])})
    if clean[-1]["role"] != "assistant":
        raise DataFormatError(path, row, f"messages[{len(clean) - 1}].role",
                              "the last message must be the assistant's answer (what the model learns to write)")
    if not any(m["role"] == "user" for m in clean):
        raise DataFormatError(path, row, "messages", "no 'user' message")
    return {"messages": clean}


def _parse_lines(path: Path, text: str) -> list[tuple[int, object]]:
    """JSON lines → [(line number, object)], blank lines ignored; a bad line raises with its number."""
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataFormatError(path, lineno, None, f"malformed JSON on line {lineno}: {err.msg} (column {err.colno})") from None
    return rows


def numbered_rows(path: str | Path) -> list[tuple[int, object]]:
    """(row number, object) of every row of a .jsonl file (line numbers) or .json file (an array: 1-based positions;
    one object; or JSON lines saved as .json); a missing, empty, rowless or malformed file raises, naming the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such data file")
    if path.suffix not in (".json", ".jsonl"):
        raise DataFormatError(path, None, None, f"unsupported file type {path.suffix!r}: use .json or .jsonl")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataFormatError(path, None, None, "the file is empty")
    if path.suffix == ".jsonl":
        numbered = _parse_lines(path, text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            if text.lstrip()[:1] != "{":  # a "{" start: JSON lines saved as .json (the `datasets` loader takes it)
                raise DataFormatError(path, None, None,
                                      f"malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
            numbered = _parse_lines(path, text)
        else:
            if isinstance(data, dict):
                data = [data]
            if not isinstance(data, list):
                raise DataFormatError(path, None, None, f"expected a JSON array of objects, got {type(data).__name__}")
            numbered = list(enumerate(data, start=1))
    if not numbered:
        raise DataFormatError(path, None, None, "the file has no rows")
    return numbered


def read_rows(path: str | Path) -> list[dict]:
    """Parse and validate a .json/.jsonl training file into canonical rows (no `datasets` involved)."""
    path = Path(path)
    rows, fmt = [], None
    for row, obj in numbered_rows(path):
        if not isinstance(obj, dict):
            raise DataFormatError(path, row, None, f"expected an object, got {type(obj).__name__}")
        this = _detect_format(path, row, obj)
        if fmt is None:
            fmt = this
        elif this != fmt:
            raise DataFormatError(path, row, None, f"row is in the {this!r} format but the file started in {fmt!r}")
        rows.append(_normalise(path, row, obj, this))
    return rows


def load_records(path: str | Path):
    """Load a validated .json/.jsonl file as a `datasets.Dataset` (columns: text | prompt, completion | messages)."""
    from datasets import Dataset

    return Dataset.from_list(read_rows(path))


def record_format(columns: Iterable[str]) -> str:
    """'text', 'prompt_completion' or 'messages' for a dataset's (normalised) column names."""
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if "text" in cols:
        return "text"
    raise ValueError(f"not a normalised record set (columns {sorted(cols)}); load it with load_records()")


def write_jsonl(records: Iterable[Mapping], path: str | Path) -> Path:
    """Write records as JSON lines (UTF-8, one object per line, keys in their given order)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


# ------------------------------------------------------------------------------------------- formatting

INSTRUCT_PROMPT = "Instruct: {prompt}\nOutput:"  # Phi-2's documented QA/instruction format (model card)


def prompt_style(tokenizer) -> str:
    """'chat' if the tokenizer has a chat template, else 'instruct' (Phi-2's ``Instruct: …\\nOutput:``)."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "instruct"


def _eos(tokenizer) -> str:
    if not tokenizer.eos_token:
        raise ValueError("the tokenizer has no eos_token: the model could never learn to stop; set one first")
    return tokenizer.eos_token


def format_prompt(prompt: str | Sequence[Mapping], tokenizer, style: str = "auto") -> str:
    """The text the model sees before its answer: a user prompt (or the chat so far) in the model's format."""
    style = prompt_style(tokenizer) if style == "auto" else style  # "instruct" needs no tokenizer
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if style == "chat":
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if style != "instruct":
        raise ValueError(f"style must be 'auto', 'chat' or 'instruct', got {style!r}")
    if len(messages) == 1 and messages[0]["role"] == "user":
        return INSTRUCT_PROMPT.format(prompt=messages[0]["content"])
    lead = {"system": "", "user": "Instruct: ", "assistant": "Output: "}  # multi-turn: the same markers per turn
    return "\n".join(lead[m["role"]] + m["content"] for m in messages) + "\nOutput:"


def format_example(record: Mapping, tokenizer, style: str = "auto") -> dict[str, str]:
    """One record → {"prompt", "completion"} strings (completion ends with EOS), or {"text"} for text records."""
    style = prompt_style(tokenizer) if style == "auto" else style
    eos = _eos(tokenizer)
    if "messages" in record and record["messages"] is not None:
        *context, answer = record["messages"]
        prompt, completion = format_prompt(context, tokenizer, style), answer["content"]
    elif record.get("prompt") is not None:
        prompt, completion = format_prompt(record["prompt"], tokenizer, style), record["completion"]
    elif record.get("text") is not None:
        text = record["text"]
        return {"text": text if text.endswith(eos) else text + eos}
    else:
        raise ValueError(f"record has none of text / prompt+completion / messages: {sorted(record)}")
    if style == "instruct":
        completion = " " + completion.lstrip()  # "Output: {answer}", the space belongs to the answer's first token
    return {"prompt": prompt, "completion": completion if completion.endswith(eos) else completion + eos}


def format_dataset(ds, tokenizer, style: str = "auto"):
    """Map a `load_records` dataset to the model's format: prompt/completion strings (or text), EOS appended."""
    fmt = record_format(ds.column_names)
    return ds.map(lambda r: format_example(r, tokenizer, style), remove_columns=ds.column_names,
                  desc=f"formatting ({fmt}, {prompt_style(tokenizer) if style == 'auto' else style})")


def token_lengths(formatted, tokenizer) -> list[int]:
    """Tokens per formatted example (prompt + completion, or text), as the trainer will see them."""
    texts = [r["text"] if "text" in r else r["prompt"] + r["completion"] for r in formatted]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def suggest_max_length(lengths: Sequence[int], multiple: int = 64) -> int:
    """The smallest multiple of `multiple` that holds the longest example (nothing is truncated)."""
    return max(multiple, -(-max(lengths) // multiple) * multiple)


def label_mask(tokenizer, input_ids: Sequence[int], labels: Sequence[int]) -> list[dict]:
    """Per token: its text, id and whether it is trained (label != -100) — to show what the loss sees."""
    return [{"token": tokenizer.decode([i]), "id": int(i), "trained": int(lab) != -100}
            for i, lab in zip(input_ids, labels, strict=True)]


# ------------------------------------------------------------------------------------------- the task

TASK_FIELDS = ("action", "device", "room", "value", "time")
TASK_SYSTEM = ("Reply with JSON only: action (on/off/set), device, room, value (number or null), "
               "time (HH:MM or null).")

ACTIONS = ("on", "off", "set")
ROOMS = {  # canonical room -> how people say it
    "kitchen": ["kitchen"],
    "living room": ["living room", "lounge"],
    "bedroom": ["bedroom"],
    "bathroom": ["bathroom"],
    "office": ["office", "study"],
    "hallway": ["hallway", "hall"],
    "garage": ["garage"],
    "dining room": ["dining room"],
    "nursery": ["nursery", "baby's room"],
    "basement": ["basement"],
}
DEVICES = {  # canonical device -> (how people say it, value range (lo, hi, step), ways to say a value)
    "light": (["light", "lights", "lamp"], (10, 100, 10), ["{v}%", "{v} percent", "{v}% brightness"]),
    "heater": (["heater", "heating", "radiator"], (16, 26, 1), ["{v} degrees", "{v}°C", "{v} °C"]),
    "fan": (["fan", "ceiling fan"], (1, 5, 1), ["speed {v}", "level {v}"]),
    "speaker": (["speaker", "music"], (5, 100, 5), ["volume {v}", "{v}% volume"]),
    "tv": (["TV", "television", "telly"], (1, 60, 1), ["channel {v}"]),
    "ac": (["air conditioner", "AC", "air con"], (17, 26, 1), ["{v} degrees", "{v}°C"]),
}
ON_TEMPLATES = ["turn on the {dev} {in_room}", "switch on the {room} {dev}", "turn the {room} {dev} on",
                "{room} {dev} on", "power up the {dev} {in_room}", "I want the {dev} {in_room} on",
                "can you turn the {dev} {in_room} on"]
OFF_TEMPLATES = ["turn off the {dev} {in_room}", "switch off the {room} {dev}", "turn the {room} {dev} off",
                 "{room} {dev} off", "shut off the {dev} {in_room}", "kill the {room} {dev}",
                 "I don't need the {dev} {in_room} anymore, switch it off"]
SET_TEMPLATES = ["set the {dev} {in_room} to {val}", "put the {room} {dev} at {val}", "{room} {dev} to {val}",
                 "change the {dev} {in_room} to {val}", "I'd like the {room} {dev} at {val}",
                 "adjust the {dev} {in_room} to {val}"]
PREFIXES = ["", "", "please ", "could you ", "hey, ", "can you "]
SUFFIXES = ["", "", " please", ", thanks", ".", "!"]
_TIME_RE = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")


def _say_time(rng: random.Random) -> tuple[str, str]:
    """A time of day as people write it and as the schema wants it (HH:MM, 24 h)."""
    hour, minute = rng.randrange(24), rng.choice([0, 0, 15, 30, 45, 5, 20, 50])
    canonical = f"{hour:02d}:{minute:02d}"
    form = rng.random()
    if form < 0.5:
        spoken = f"{hour}:{minute:02d}"
    else:  # 12-hour clock
        h12, ampm = (hour % 12) or 12, ("am" if hour < 12 else "pm")
        spoken = f"{h12} {ampm}" if minute == 0 else f"{h12}:{minute:02d} {ampm}"
    return spoken, canonical


def _request(rng: random.Random, device: str, room: str) -> tuple[str, dict]:
    """One free-text request for (device, room) and its target record."""
    names, (lo, hi, step), value_forms = DEVICES[device]
    action = rng.choices(ACTIONS, weights=[1, 1, 1.5])[0]
    dev, room_said = rng.choice(names), rng.choice(ROOMS[room])
    value = None
    if action == "set":
        value = rng.randrange(lo, hi + 1, step)
        template = rng.choice(SET_TEMPLATES)
    else:
        template = rng.choice(ON_TEMPLATES if action == "on" else OFF_TEMPLATES)
    text = template.format(dev=dev, room=room_said, in_room=f"in the {room_said}",
                           val=rng.choice(value_forms).format(v=value) if value is not None else "")
    # full sentences ("I'd like…", "can you…") and terse ones ("kitchen lights off") take no "please"/"could you"
    prefix = "" if template.startswith(("I", "can you", "{room}")) else rng.choice(PREFIXES)
    text = prefix + text
    time = None
    if rng.random() < 0.35:
        spoken, time = _say_time(rng)
        text = f"at {spoken}, {text}" if not prefix and rng.random() < 0.4 else f"{text} at {spoken}"
    text += rng.choice(SUFFIXES)
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    return text, {"action": action, "device": device, "room": room, "value": value, "time": time}


def heldout_pairs(seed: int = 0, fraction: float = 0.2) -> list[tuple[str, str]]:
    """The (device, room) combinations reserved for the held-out split; every device and room stays in training."""
    rng = random.Random(f"heldout-{seed}")
    pairs = [(d, r) for d in DEVICES for r in ROOMS]
    n = round(fraction * len(pairs))
    while True:
        chosen = sorted(rng.sample(pairs, n))
        rest = set(pairs) - set(chosen)
        if {d for d, _ in rest} == set(DEVICES) and {r for _, r in rest} == set(ROOMS):
            return chosen


def task_record(request: str, target: Mapping) -> dict:
    """One chat record of the task: the schema as the system message, the request, the JSON answer (compact)."""
    return {"messages": [{"role": "system", "content": TASK_SYSTEM},
                         {"role": "user", "content": request},
                         {"role": "assistant", "content": json.dumps(dict(target), separators=(",", ":"))}]}


def make_task_records(seed: int = 0, n_train: int = 1500, n_heldout: int = 200,
                      heldout_fraction: float = 0.2) -> dict[str, list[dict]]:
    """The synthetic task, seeded: {"train": [...], "heldout": [...]} chat records (see `task_record`).

    The held-out requests use only (device, room) pairs that never occur in training, and no request text
    appears in both splits.
    """
    rng = random.Random(seed)
    held = set(heldout_pairs(seed, heldout_fraction))
    train_pairs = sorted({(d, r) for d in DEVICES for r in ROOMS} - held)
    splits: dict[str, list[dict]] = {"train": [], "heldout": []}
    seen: set[str] = set()
    for split, pairs, n in (("train", train_pairs, n_train), ("heldout", sorted(held), n_heldout)):
        while len(splits[split]) < n:
            text, target = _request(rng, *rng.choice(pairs))
            if text in seen:
                continue
            seen.add(text)
            splits[split].append(task_record(text, target))
    return splits


def split_record(record: Mapping) -> tuple[str | list[dict], str]:
    """(prompt, answer) of a prompt/completion or chat record: what the model is given and what it should write."""
    if record.get("messages") is not None:
        return [dict(m) for m in record["messages"][:-1]], record["messages"][-1]["content"]
    return record["prompt"], record["completion"]


def parse_prediction(text: str) -> dict | None:
    """The first JSON object in a generation (text around it ignored), or None if there is none."""
    if not isinstance(text, str):
        return None
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def schema_problems(obj) -> list[str]:
    """What is wrong with a predicted record against the task schema ([] = valid)."""
    if not isinstance(obj, dict):
        return ["not a JSON object"]
    out = []
    if set(obj) != set(TASK_FIELDS):
        out.append(f"keys {sorted(obj)} != {sorted(TASK_FIELDS)}")
    # a model may put any JSON value in a field (a list, an object): only strings can be names
    if not (isinstance(obj.get("action"), str) and obj["action"] in ACTIONS):
        out.append(f"action {obj.get('action')!r} not in {ACTIONS}")
    if not (isinstance(obj.get("device"), str) and obj["device"] in DEVICES):
        out.append(f"device {obj.get('device')!r} unknown")
    if not (isinstance(obj.get("room"), str) and obj["room"] in ROOMS):
        out.append(f"room {obj.get('room')!r} unknown")
    value = obj.get("value")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        out.append(f"value {value!r} is not an integer or null")
    time = obj.get("time")
    if time is not None and not (isinstance(time, str) and _TIME_RE.match(time)):
        out.append(f"time {time!r} is not HH:MM or null")
    return out


def item_outcomes(outputs: Sequence[str], answers: Sequence[str]) -> dict[str, list[int]]:
    """0/1 per item, for paired tests: exact match (the parsed answer equals the record's) and schema validity."""
    parsed = [parse_prediction(o) for o in outputs]
    gold = [json.loads(a) for a in answers]
    return {"em": [int(p is not None and p == g) for p, g in zip(parsed, gold, strict=True)],
            "valid": [int(not schema_problems(p)) for p in parsed]}


def score_predictions(preds: Sequence[str | Mapping | None], targets: Sequence[str | Mapping]) -> dict:
    """Exact match per field, schema validity and whole-record exact match, as fractions of the n examples."""
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions for {len(targets)} targets")
    n = len(targets)
    if n == 0:
        raise ValueError("nothing to score")
    parsed = [p if isinstance(p, Mapping) or p is None else parse_prediction(p) for p in preds]
    gold = [json.loads(t) if isinstance(t, str) else dict(t) for t in targets]
    fields = {f: sum(1 for p, g in zip(parsed, gold, strict=True) if p is not None and f in p and p[f] == g[f]) / n
              for f in TASK_FIELDS}
    return {
        "n": n,
        "parsed": sum(p is not None for p in parsed) / n,
        "schema_valid": sum(not schema_problems(p) for p in parsed) / n,
        "exact_match": sum(p is not None and dict(p) == g for p, g in zip(parsed, gold, strict=True)) / n,
        "field_accuracy": fields,
    }
