"""helpers.prefs: near-miss generators, pair validation (file/row/field errors), held-out leakage, DPO on tiny-phi
(TRL's "ref" adapter stays frozen, the margins helper agrees with TRL's own evaluation)."""

from __future__ import annotations

import json
import math
import random

import pytest

from helpers import data, env, prefs

TRAIN = data.read_rows(env.DATA_DIR / "sft" / "train.jsonl")
HELDOUT = data.read_rows(env.DATA_DIR / "sft" / "heldout.jsonl")


def answer_of(rec: dict) -> str:
    return data.split_record(rec)[1]


def record_with(pred) -> dict:
    return next(r for r in TRAIN if pred(json.loads(answer_of(r))))


@pytest.mark.parametrize("field,kind", [("room", "wrong_room"), ("device", "wrong_device"), ("value", "wrong_value")])
def test_one_field_wrong_changes_exactly_that_field_and_stays_valid(field, kind):
    rng = random.Random(0)
    for rec in TRAIN[:40]:
        gold = json.loads(answer_of(rec))
        out = prefs.near_miss(answer_of(rec), kind, rng)
        got = data.parse_prediction(out)
        assert data.schema_problems(got) == [], (kind, out)
        assert [f for f in data.TASK_FIELDS if got[f] != gold[f]] == [field], (kind, out, gold)


def test_missing_time_only_where_there_is_a_time():
    timed = record_with(lambda t: t["time"] is not None)
    untimed = record_with(lambda t: t["time"] is None)
    out = json.loads(prefs.near_miss(answer_of(timed), "missing_time", random.Random(0)))
    assert out["time"] is None and {**out, "time": json.loads(answer_of(timed))["time"]} == json.loads(answer_of(timed))
    assert prefs.near_miss(answer_of(untimed), "missing_time", random.Random(0)) is None


def test_invalid_json_does_not_parse_and_chatter_and_run_on_keep_the_record():
    rng = random.Random(1)
    for rec in TRAIN[:30]:
        ans = answer_of(rec)
        assert data.parse_prediction(prefs.near_miss(ans, "invalid_json", rng)) is None
        chatter = prefs.near_miss(ans, "extra_chatter", rng)
        assert chatter != ans and ans in chatter and data.parse_prediction(chatter) == json.loads(ans)
        run_on = prefs.near_miss(ans, "missing_eos", rng)
        assert run_on.startswith(ans + "\n") and len(run_on) > len(ans)
    with pytest.raises(ValueError, match="unknown near-miss"):
        prefs.near_miss(answer_of(TRAIN[0]), "typo", rng)


def test_build_pairs_seeded_valid_and_never_equal():
    recs = TRAIN[:50]
    failures = [["{\"action\":\"on\"}", answer_of(r)] if i % 5 == 0 else [] for i, r in enumerate(recs)]
    failures = [prefs.wrong_answers(f, answer_of(r)) for f, r in zip(failures, recs, strict=True)]
    pairs = prefs.build_pairs(recs, failures, near_misses_per_prompt=2, seed=3)
    assert pairs == prefs.build_pairs(recs, failures, near_misses_per_prompt=2, seed=3)      # seeded
    assert pairs != prefs.build_pairs(recs, failures, near_misses_per_prompt=2, seed=4)
    counts = prefs.kind_counts(pairs)
    assert counts["model"] == 10 and sum(counts.values()) == 10 + 2 * len(recs)              # the right answer is dropped
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    assert prefs.validate_pairs(pairs, heldout_requests=prefs.user_requests(HELDOUT)) == "conversational"
    assert not prefs.user_requests(HELDOUT) & {m["content"] for p in pairs for m in p["prompt"] if m["role"] == "user"}


def write(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_validation_errors_name_file_row_and_field(tmp_path):
    good = {"prompt": "kitchen light on", "chosen": "{\"a\":1}", "rejected": "{\"a\":2}"}
    cases = {
        "missing.jsonl": ([good, {"prompt": "x", "chosen": "y"}], 2, "rejected"),
        "wrong_type.jsonl": ([good, good, {**good, "chosen": 3}], 3, "chosen"),
        "same.jsonl": ([{**good, "rejected": good["chosen"]}], 1, "rejected"),
        "mixed.jsonl": ([good, {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
                                "rejected": [{"role": "assistant", "content": "b"}]}], 2, "prompt"),
        "bad_role.jsonl": ([{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "user", "content": "a"}],
                             "rejected": [{"role": "assistant", "content": "b"}]}], 1, "chosen[0].role"),
    }
    for name, (rows, row, field) in cases.items():
        path = write(tmp_path, name, rows)
        with pytest.raises(data.DataFormatError) as err:
            prefs.read_pairs(path)
        assert (err.value.row, err.value.field) == (row, field), (name, err.value)
        assert str(path) in str(err.value)
    # "x" and "x<eos>" are one answer to TRL (it appends EOS to plain answers): caught when eos is given
    eos_path = write(tmp_path, "eos.jsonl", [good, {**good, "rejected": good["chosen"] + "</s>"}])
    assert len(prefs.read_pairs(eos_path)) == 2
    with pytest.raises(data.DataFormatError, match="identical") as err:
        prefs.read_pairs(eos_path, eos="</s>")
    assert err.value.row == 2
    bad_json = tmp_path / "broken.jsonl"
    bad_json.write_text(json.dumps(good) + "\n{\"prompt\": \n")
    with pytest.raises(data.DataFormatError) as err:
        prefs.read_pairs(bad_json)
    assert err.value.row == 2


def test_heldout_prompt_is_rejected(tmp_path):
    leak = prefs.build_pairs(HELDOUT[:1], seed=0)
    path = write(tmp_path, "leak.jsonl", prefs.build_pairs(TRAIN[:3], seed=0) + leak)
    with pytest.raises(data.DataFormatError, match="held-out") as err:
        prefs.read_pairs(path, heldout_requests=prefs.user_requests(HELDOUT))
    assert (err.value.row, err.value.field) == (4, "prompt")


@pytest.mark.slow
def test_dpo_config_cpu_defaults_and_tiny_phi_training(tmp_path):
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftModel, get_peft_model
    from trl import DPOConfig, DPOTrainer

    from helpers import models

    if not torch.cuda.is_available():  # the pitfall the notebook explains: TRL's default precision on a CPU
        with pytest.raises(ValueError, match="bf16"):
            DPOConfig(output_dir=str(tmp_path / "x"))
        assert DPOConfig(output_dir=str(tmp_path / "x"), use_cpu=True).bf16 is True      # use_cpu alone: bf16 autocast
        assert DPOConfig(output_dir=str(tmp_path / "x"), use_cpu=True).activation_checkpointing is True  # TRL's default
    mixed = prefs.dpo_config(tmp_path / "mixed")                                       # the notebook's loss: DPO + SFT term
    assert (mixed.loss_type, mixed.loss_weights) == (["sigmoid", "sft"], [1.0, 1.0])
    cfg = prefs.dpo_config(tmp_path / "dpo", max_steps=4, batch_size=4, learning_rate=5e-3, max_length=256,
                           loss_type=("sigmoid",), loss_weights=None)                    # pure DPO: loss log 2 at step 1
    assert (cfg.bf16, cfg.fp16, cfg.beta, cfg.loss_type, cfg.activation_checkpointing) == (False, False, 0.1, ["sigmoid"], False)

    env.set_seed(0)
    tok = models.load_tokenizer("tiny-phi")
    sft = get_peft_model(models.load_model("tiny-phi", dtype="float32"),
                         LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, p in sft.named_parameters():  # a non-zero "SFT" adapter, so that the reference differs from the base
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    sft.save_pretrained(tmp_path / "adapter")
    policy = PeftModel.from_pretrained(models.load_model("tiny-phi", dtype="float32"), tmp_path / "adapter", is_trainable=True)
    plain = prefs.to_plain(prefs.build_pairs(TRAIN[:8], seed=0), tok)
    assert all(p["chosen"].endswith(tok.eos_token) and p["rejected"].endswith(tok.eos_token) for p in plain)
    lengths = prefs.pair_lengths(plain, tok)
    assert max(lengths["chosen"] + lengths["rejected"]) <= cfg.max_length                # nothing is truncated
    trainer = DPOTrainer(model=policy, args=cfg, train_dataset=Dataset.from_list(plain), eval_dataset=Dataset.from_list(plain),
                         processing_class=tok)
    assert set(trainer.model.peft_config) == {"default", "ref"}                          # the SFT adapter, twice
    assert max(map(abs, prefs.pair_margins(trainer.model, tok, plain, cfg.beta))) < 1e-5  # policy == reference
    ref_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".ref." in n}
    trainer.train()
    margins = prefs.pair_margins(trainer.model, tok, plain, cfg.beta)
    assert trainer.model.active_adapter == "default"                                     # the helper switched back
    ev = trainer.evaluate()                                                              # TRL's own margins, 2 batches of 4
    assert sum(margins) / len(margins) == pytest.approx(ev["eval_rewards/margins"], abs=1e-4)
    assert sum(m > 0 for m in margins) / len(margins) == pytest.approx(ev["eval_rewards/accuracies"], abs=1e-6)
    assert sum(margins) / len(margins) > 0
    hist = prefs.reward_history(trainer)
    assert hist["step"] == [1, 2, 3, 4] and all(math.isfinite(v) for k in ("loss", "margin") for v in hist[k])
    assert hist["margin"][0] == 0.0 and hist["loss"][0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
    assert hist["margin"][-1] > hist["margin"][0] and hist["loss"][-1] < hist["loss"][0]
    params = dict(trainer.model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in ref_before.items())                 # the reference stays frozen
    assert any(not torch.equal(params[n.replace(".ref.", ".default.")], p) for n, p in ref_before.items())


def test_sample_answers_seeded_and_wrong_answers_filter():
    import torch

    from helpers import models

    tok = models.load_tokenizer("tiny-phi")
    model = models.load_model("tiny-phi", dtype="float32")
    prompts = [data.format_prompt(data.split_record(r)[0], tok) for r in TRAIN[:3]]
    torch.manual_seed(123)
    caller_state = torch.random.get_rng_state()
    a = prefs.sample_answers(model, tok, prompts, n_samples=2, max_new_tokens=6, batch_size=2, seed=1)
    assert torch.equal(torch.random.get_rng_state(), caller_state)  # the caller's random stream is left as it was
    b = prefs.sample_answers(model, tok, prompts, n_samples=2, max_new_tokens=6, batch_size=2, seed=1)
    assert a == b and len(a) == 3 and all(len(s) == 2 for s in a)                       # seeded, grouped per prompt
    assert prefs.sample_answers(model, tok, prompts, n_samples=2, max_new_tokens=6, batch_size=2, seed=2) != a
    ans = answer_of(TRAIN[0])
    kept = prefs.wrong_answers([ans, " ", "oops", "oops", "Sure: " + ans, ans.replace("null", "\"07:00\"", 1)], ans)
    assert kept == ["oops", ans.replace("null", "\"07:00\"", 1)]


def test_dpo_on_a_4bit_base_casts_the_policy_adapter_to_bf16(tmp_path):
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl import DPOTrainer

    from helpers import models, quant

    def nf4_base():
        return AutoModelForCausalLM.from_pretrained(models.model_path("tiny-phi"), dtype=torch.float32,
                                                    quantization_config=quant.bnb_config("nf4", "float32", double_quant=True))

    env.set_seed(0)
    tok = models.load_tokenizer("tiny-phi")
    sft = get_peft_model(nf4_base(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    sft.save_pretrained(tmp_path / "adapter")
    policy = PeftModel.from_pretrained(nf4_base(), tmp_path / "adapter", is_trainable=True)
    plain = prefs.to_plain(prefs.build_pairs(TRAIN[:2], seed=0), tok)
    cfg = prefs.dpo_config(tmp_path / "dpo", max_steps=2, batch_size=2, learning_rate=1e-3, max_length=256)
    trainer = DPOTrainer(model=policy, args=cfg, train_dataset=Dataset.from_list(plain), processing_class=tok)
    dtypes = {(".ref." in n, p.dtype) for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}                    # QLoRA: policy in bf16
    trainer.train()
    hist = prefs.reward_history(trainer)
    assert hist["step"] == [1, 2] and abs(hist["margin"][0]) < 1e-2 and all(map(math.isfinite, hist["loss"]))
    margins = prefs.pair_margins(trainer.model, tok, plain, cfg.beta)
    assert len(margins) == len(plain) and all(map(math.isfinite, margins))


# ------------------------------------------------------------------------------------------- on-policy pairs, gate


def test_on_policy_pairs_label_samples_with_the_task_checker():
    rec = TRAIN[0]
    gold = json.loads(answer_of(rec))
    right = json.dumps(gold, separators=(",", ":"))
    wrong1 = json.dumps({**gold, "room": "attic" if gold["room"] != "attic" else "garage"})
    wrong2 = "not json at all"
    pairs = prefs.on_policy_pairs([rec, rec, rec], [[wrong1, right, wrong1, wrong2], [wrong2], [right, right]])
    # prompt 1: chosen = the model's own right sample; rejected = the two distinct wrong ones (duplicate dropped)
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"], p["kind"]) for p in pairs[:2]] == [
        (right, wrong1, "on-policy"), (right, wrong2, "on-policy")]
    # prompt 2: no right sample -> the record's answer is chosen; prompt 3: nothing wrong -> no pair
    assert (pairs[2]["chosen"][0]["content"], pairs[2]["kind"]) == (answer_of(rec), "gold chosen") and len(pairs) == 3
    assert prefs.is_right("Sure: " + right, answer_of(rec)) and not prefs.is_right(wrong1, answer_of(rec))
    with pytest.raises(ValueError, match="sample lists"):
        prefs.on_policy_pairs([rec], [])


@pytest.mark.parametrize("a,b,diff", [([1, 2, 3], [1, 2, 3], 0), ([1, 2, 3], [1, 9, 3], 1), ([1, 2, 3], [1, 2, 3, 4, 5], 2),
                                      ([1, 2], [3, 4, 5], 3), ([1, 2, 3, 4], [1, 4], 2)])
def test_token_difference_on_hand_examples(a, b, diff):
    assert prefs.token_difference(a, b) == diff


class CharTokenizer:
    """One token per character: token counts are character counts."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_near_identical_pairs_are_dropped():
    def pair(c, r):
        return {"prompt": "p", "chosen": c, "rejected": r}

    kept, dropped = prefs.drop_near_identical([pair("abc", "abd"), pair("abc", "xyz"), pair("abc", "abcd")],
                                              CharTokenizer(), min_tokens=2)
    assert [p["rejected"] for p in kept] == ["xyz"] and [p["rejected"] for p in dropped] == ["abd", "abcd"]


def test_acceptance_gate_rejects_only_a_significantly_worse_adapter():
    from scipy import stats

    sft, worse = [1] * 20 + [0] * 80, [0] * 18 + [1] * 2 + [1] * 2 + [0] * 78   # SFT alone right 18x, tuned alone 2x
    gate = prefs.acceptance_gate(sft, worse)
    assert gate["kept"] == "sft" and (gate["sft_only"], gate["tuned_only"]) == (18, 2)
    assert math.isclose(gate["p_value"], stats.binomtest(18, 20, 0.5).pvalue)   # the independent oracle
    assert prefs.acceptance_gate(sft, [0] * 4 + [1] * 16 + [1] * 3 + [0] * 77)["kept"] == "tuned"   # 4 vs 3: noise
    assert prefs.acceptance_gate(worse, sft)["kept"] == "tuned"                  # significantly better is kept
