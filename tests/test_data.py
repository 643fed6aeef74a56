"""helpers.data: loading + validation of every accepted format, formatting, the task generator and its scorer."""

import json
import subprocess
import sys

import pytest

from helpers import data, env
from helpers.data import DataFormatError


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# ------------------------------------------------------------------------------------------- loading


def test_load_each_format(tmp_path):
    text = write(tmp_path, "t.json", json.dumps([{"text": "a b"}, {"text": "c"}]))
    pc = write(tmp_path, "pc.jsonl", '{"prompt": "p1", "completion": "c1"}\n\n{"prompt": "p2", "completion": "c2"}\n')
    ir = write(tmp_path, "ir.jsonl", json.dumps({"instruction": "Do", "input": "this", "response": "ok"}) + "\n"
               + json.dumps({"instruction": "Do", "input": "", "response": "ok2"}) + "\n")
    msgs = write(tmp_path, "m.json", json.dumps([{"messages": [{"role": "system", "content": "s"},
                                                            {"role": "user", "content": "u"},
                                                            {"role": "assistant", "content": "a"}]}]))
    assert data.load_records(text).column_names == ["text"]
    ds = data.load_records(pc)
    assert ds.column_names == ["prompt", "completion"] and len(ds) == 2 and ds[1]["completion"] == "c2"
    ds = data.load_records(ir)
    assert ds.column_names == ["prompt", "completion"]
    assert ds[0]["prompt"] == "Do\n\nthis" and ds[1]["prompt"] == "Do" and ds[1]["completion"] == "ok2"
    ds = data.load_records(msgs)
    assert ds.column_names == ["messages"] and ds[0]["messages"][2] == {"role": "assistant", "content": "a"}
    # JSON lines saved with a .json suffix (what `datasets` also accepts)
    jl = write(tmp_path, "jl.json", '{"text": "x"}\n{"text": "y"}\n')
    assert len(data.load_records(jl)) == 2


def test_shipped_files_load():
    assert len(data.load_records(env.DATA_DIR / "sft" / "train.jsonl")) == 1500
    assert len(data.load_records(env.DATA_DIR / "sft" / "heldout.jsonl")) == 200
    seed = data.load_records(env.DATA_DIR / "seed_sft_example.json")
    assert seed.column_names == ["text"] and seed[0]["text"].startswith(data.TASK_SYSTEM + "\nInstruct: ")
    assert "\nOutput: {" in seed[0]["text"]


@pytest.mark.parametrize("name,text,row,field,words", [
    ("empty.jsonl", "  \n", None, None, "empty"),
    ("bad.jsonl", '{"text": "ok"}\n{"text": "unterminated\n', 2, None, "malformed JSON on line 2"),
    ("bad.json", '[{"text": "ok"}, {"text": ]', None, None, "malformed JSON at line 1"),
    ("missing.jsonl", '{"prompt": "p", "completion": "c"}\n{"prompt": "p"}\n', 2, "completion", "missing"),
    ("type.jsonl", '{"prompt": "p", "completion": 3}\n', 1, "completion", "expected a string, got int"),
    ("blank.json", '[{"text": "a"}, {"text": "   "}]', 2, "text", "empty string"),
    ("mixed.jsonl", '{"text": "a"}\n{"prompt": "p", "completion": "c"}\n', 2, None, "started in 'text'"),
    ("unknown.jsonl", '{"question": "q", "answer": "a"}\n', 1, None, "no known fields"),
    ("notobj.json", '[{"text": "a"}, ["text"]]', 2, None, "expected an object"),
    ("toplevel.json", '"just a string"', None, None, "expected a JSON array"),
    ("norows.json", "[]", None, None, "no rows"),
    ("role.jsonl", '{"messages": [{"role": "bot", "content": "x"}]}\n', 1, "messages[0].role", "not one of"),
    ("last.jsonl", '{"messages": [{"role": "user", "content": "x"}]}\n', 1, "messages[0].role", "last message"),
    ("content.jsonl", '{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}\n', 1,
     "messages[0].content", "missing"),
    ("msgtype.jsonl", '{"messages": "hi"}\n', 1, "messages", "non-empty list"),
    ("instr.jsonl", '{"instruction": "i", "response": ""}\n', 1, "response", "empty string"),
])
def test_bad_files_raise_naming_file_row_field(tmp_path, name, text, row, field, words):
    path = write(tmp_path, name, text)
    with pytest.raises(DataFormatError) as info:
        data.load_records(path)
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.row, err.field) == (row, field)
    assert str(path) in str(err) and words in str(err)
    if row is not None:
        assert f"row {row}" in str(err)
    if field is not None:
        assert repr(field) in str(err)


def test_wrong_suffix_and_missing_file(tmp_path):
    with pytest.raises(DataFormatError, match="unsupported file type '.csv'"):
        data.load_records(write(tmp_path, "x.csv", "a,b\n"))
    with pytest.raises(FileNotFoundError):
        data.load_records(tmp_path / "nope.jsonl")


# ------------------------------------------------------------------------------------------- formatting


class FakeTok:
    """The parts of a tokenizer that formatting uses (no chat template → Phi-2 style)."""

    chat_template = None
    eos_token = "<|endoftext|>"


def test_instruct_format_and_eos():
    tok = FakeTok()
    assert data.prompt_style(tok) == "instruct"
    ex = data.format_example({"prompt": "Say hi", "completion": "hi"}, tok)
    assert ex == {"prompt": "Instruct: Say hi\nOutput:", "completion": " hi<|endoftext|>"}
    # EOS not doubled, text records get EOS too
    assert data.format_example({"prompt": "p", "completion": "c<|endoftext|>"}, tok)["completion"] == " c<|endoftext|>"
    assert data.format_example({"text": "abc"}, tok) == {"text": "abc<|endoftext|>"}
    chat = {"messages": [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
                         {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]}
    ex = data.format_example(chat, tok)
    assert ex["prompt"] == "Instruct: u1\nOutput: a1\nInstruct: u2\nOutput:" and ex["completion"] == " a2<|endoftext|>"


def test_no_eos_raises():
    tok = FakeTok()
    tok.eos_token = None
    with pytest.raises(ValueError, match="no eos_token"):
        data.format_example({"prompt": "p", "completion": "c"}, tok)


@pytest.mark.slow
def test_chat_template_format_with_real_tokenizer():
    from helpers import models

    tok = models.load_tokenizer("smollm2-135m")
    assert data.prompt_style(tok) == "chat"
    ex = data.format_example({"prompt": "hi", "completion": "{}"}, tok)
    assert ex["prompt"].endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert ex["completion"] == "{}<|im_end|>" and tok.eos_token == "<|im_end|>"
    # what the trainer will see: the full chat ends with the EOS token id
    ids = tok(ex["prompt"] + ex["completion"], add_special_tokens=False)["input_ids"]
    assert ids[-1] == tok.eos_token_id


def test_lengths_and_max_length():
    assert data.suggest_max_length([10, 130, 64]) == 192
    assert data.suggest_max_length([10], multiple=64) == 64
    assert data.suggest_max_length([128]) == 128


# ------------------------------------------------------------------------------------------- the task


def test_generator_is_seeded_and_heldout_combinations_are_unseen():
    a, b = data.make_task_records(0, 300, 60), data.make_task_records(0, 300, 60)
    assert a == b
    assert data.make_task_records(1, 300, 60) != a
    assert len(a["train"]) == 300 and len(a["heldout"]) == 60

    def pair(rec):
        t = json.loads(rec["messages"][-1]["content"])
        return t["device"], t["room"]

    held = set(data.heldout_pairs(0))
    assert {pair(r) for r in a["heldout"]} <= held
    assert not {pair(r) for r in a["train"]} & held
    assert not {r["messages"][1]["content"] for r in a["train"]} & {r["messages"][1]["content"] for r in a["heldout"]}
    # every device and every room is still taught in training
    assert {d for d, _ in map(pair, a["train"])} == set(data.DEVICES)
    assert {r for _, r in map(pair, a["train"])} == set(data.ROOMS)
    for rec in a["train"] + a["heldout"]:
        prompt, answer = data.split_record(rec)
        assert data.schema_problems(json.loads(answer)) == []
        assert [m["role"] for m in prompt] == ["system", "user"] and prompt[0]["content"] == data.TASK_SYSTEM


def test_committed_dataset_matches_generator():
    script = env.DATA_DIR / "sft" / "make_dataset.py"
    res = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_parse_prediction():
    assert data.parse_prediction('{"a": 1}') == {"a": 1}
    assert data.parse_prediction('Sure! {"a": {"b": 2}} done') == {"a": {"b": 2}}
    assert data.parse_prediction('{broken {"a": 1}') == {"a": 1}
    assert data.parse_prediction("no json here") is None
    assert data.parse_prediction("[1, 2]") is None
    assert data.parse_prediction(None) is None


def test_score_predictions_exact_numbers():
    gold = [{"action": "on", "device": "light", "room": "kitchen", "value": None, "time": None},
            {"action": "set", "device": "fan", "room": "office", "value": 3, "time": "07:30"},
            {"action": "off", "device": "tv", "room": "garage", "value": None, "time": None},
            {"action": "set", "device": "heater", "room": "bedroom", "value": 21, "time": None}]
    preds = [json.dumps(gold[0]),                                   # exact
             '{"action": "set", "device": "fan", "room": "office", "value": 3, "time": "7:30"}',  # bad time
             "I cannot do that",                                    # nothing parsed
             {"action": "set", "device": "heater", "room": "bedroom", "value": 21}]  # key missing
    s = data.score_predictions(preds, [json.dumps(g) for g in gold])
    assert s["n"] == 4
    assert s["parsed"] == 0.75
    assert s["schema_valid"] == 0.25          # only the first: "7:30" is not HH:MM, the last lacks "time"
    assert s["exact_match"] == 0.25
    assert s["field_accuracy"] == {"action": 0.75, "device": 0.75, "room": 0.75, "value": 0.75, "time": 0.25}
    with pytest.raises(ValueError):
        data.score_predictions(preds[:2], gold)


def test_schema_problems():
    ok = {"action": "on", "device": "light", "room": "kitchen", "value": None, "time": None}
    assert data.schema_problems(ok) == []
    assert data.schema_problems({**ok, "value": True})  # bool is not a number here
    assert data.schema_problems({**ok, "device": "toaster"})
    assert data.schema_problems({**ok, "time": "25:00"})
    assert data.schema_problems("x") == ["not a JSON object"]
    # unhashable values where a name belongs (a base model once answered {"device": {...}}): a problem, not a crash
    nested = {**ok, "device": {"name": "lamp"}, "room": ["kitchen"], "action": None}
    assert len(data.schema_problems(nested)) == 3
    scores = data.score_predictions([json.dumps(nested)], [json.dumps(ok)])
    assert scores["schema_valid"] == 0 and scores["parsed"] == 1 and scores["exact_match"] == 0
