"""helpers.rewards: each reward part on hand-made completions (exact values), the TRL call signature, group
statistics against numpy, GRPO's log history, the tolerant reader of notebook 07's results and the verdicts."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from helpers import data, env, evals, prefs, rewards

GOLD = '{"action":"set","device":"light","room":"kitchen","value":50,"time":"07:30"}'
NULLS = '{"action":"on","device":"fan","room":"office","value":null,"time":null}'

# completion -> (parses, fits_schema, fields_equal, only_json), written by hand for GOLD
CASES = {
    GOLD: (1, 1, 1, 1),                                                                    # the answer itself
    "  " + GOLD + "\n": (1, 1, 1, 1),                                                      # whitespace is not chatter
    '{"action": "set", "device": "light", "room": "kitchen", "value": 50, "time": "07:30"}': (1, 1, 1, 1),  # spacing
    "Sure! Here is the JSON: " + GOLD + " Done!": (1, 1, 1, 0),                            # chatter around it
    GOLD + "\n" + GOLD: (1, 1, 1, 0),                                                      # ran on past its end
    GOLD[:-1]: (0, 0, 0, 0),                                                               # unclosed: invalid JSON
    GOLD.replace('"', "'"): (0, 0, 0, 0),                                                  # Python quotes
    GOLD.replace('"kitchen"', '"bedroom"'): (1, 1, 0.8, 1),                                # one field wrong
    GOLD.replace('"kitchen"', '"attic"'): (1, 0, 0.8, 1),                                  # wrong and not a room
    '{"action":"set","device":"light","room":"kitchen","value":50}': (1, 0, 0.8, 1),      # time missing
    '{"action":"set","device":"light","room":"kitchen","value":"50","time":"07:30"}': (1, 0, 0.8, 1),  # "50" != 50
    GOLD[:-1] + ',"extra":1}': (1, 0, 1, 1),                                               # every field, one key too many
    '{"action":"off","device":"tv","room":"garage","value":null,"time":null}': (1, 1, 0, 1),  # all five wrong
    "[1, 2, 3]": (0, 0, 0, 0),                                                             # JSON, but not an object
    "": (0, 0, 0, 0),
}


@pytest.mark.parametrize("completion", list(CASES), ids=range(len(CASES)))
def test_each_part_on_hand_made_completions(completion):
    got = rewards.reward_parts([completion], [GOLD])
    assert tuple(got[p][0] for p in rewards.PARTS) == pytest.approx(CASES[completion])


def test_trl_signature_batches_and_conversational_completions():
    comps = list(CASES)
    answers = [GOLD] * len(comps)
    prompts = ["p"] * len(comps)
    for i, f in enumerate(rewards.REWARD_FUNCS):
        # GRPOTrainer passes prompts, completions, completion_ids, every other dataset column and its own extras
        out = f(prompts=prompts, completions=comps, completion_ids=[[1]] * len(comps), answer=answers,
                trainer_state=None, log_extra=None, log_metric=None)
        assert out == [float(CASES[c][i]) for c in comps] and all(isinstance(x, float) for x in out)
    conv = [[{"role": "assistant", "content": c}] for c in comps]
    assert rewards.reward_parts(conv, answers) == rewards.reward_parts(comps, answers)
    with pytest.raises(ValueError, match="answers for"):
        rewards.fields_reward(prompts, comps, answer=answers[:-1])


def test_null_fields_and_partial_credit_count_each_field():
    assert rewards.field_credit(json.loads(NULLS), NULLS) == 1.0
    missing_nulls = {"action": "on", "device": "fan", "room": "office"}        # null is a value: missing is wrong
    assert rewards.field_credit(missing_nulls, NULLS) == pytest.approx(3 / 5)
    assert rewards.field_credit(None, NULLS) == 0.0
    assert rewards.total_reward([NULLS, "x"], [NULLS, NULLS]) == [4.0, 0.0]
    assert rewards.total_reward([NULLS], [NULLS], weights=[0, 0, 2, 0]) == [2.0]
    with pytest.raises(ValueError, match="weights"):
        rewards.total_reward([NULLS], [NULLS], weights=[1, 1])


def test_full_fields_and_schema_is_exactly_the_scorers_exact_match():
    """Independent oracle: helpers.data.score_predictions on every case, and on the near-misses of real records."""
    rng = random.Random(0)
    records = data.read_rows(env.DATA_DIR / "sft" / "train.jsonl")[:30]
    comps, answers = list(CASES), [GOLD] * len(CASES)
    for rec in records:
        answer = data.split_record(rec)[1]
        for kind in prefs.NEAR_MISS_KINDS:
            text = prefs.near_miss(answer, kind, rng)
            if text is not None:
                comps.append(text)
                answers.append(answer)
    parts = rewards.reward_parts(comps, answers)
    for i, (c, a) in enumerate(zip(comps, answers, strict=True)):
        exact = data.score_predictions([c], [a])["exact_match"]
        assert (parts["fields_equal"][i] == 1.0 and parts["fits_schema"][i] == 1.0) == (exact == 1.0), c
        assert parts["parses"][i] == data.score_predictions([c], [a])["parsed"]
    assert data.item_outcomes(comps, answers)["em"] == [int(data.score_predictions([c], [a])["exact_match"])
                                                         for c, a in zip(comps, answers, strict=True)]


def test_group_stats_against_numpy():
    r = [4, 4, 4, 4, 4, 3.2, 4, 0, 1, 1, 1, 1]          # groups of 4: all equal, mixed, all equal
    s = rewards.group_stats(r, 4)
    g = np.array(r, dtype=float).reshape(-1, 4)
    assert s["groups"] == 3 and s["zero_variance"] == pytest.approx(2 / 3)
    assert s["mean_std"] == pytest.approx(g.std(axis=1).mean()) and s["mean_reward"] == pytest.approx(np.mean(r))
    with pytest.raises(ValueError):
        rewards.group_stats(r, 5)
    with pytest.raises(ValueError):
        rewards.group_stats(r[:4], 1)


def test_grpo_history_reads_what_trl_logs():
    logs = [{"loss": 0.1, "reward": 3.5, "reward_std": 0.2, "kl": 0.0, "frac_reward_zero_std": 0.5,
             "completions/mean_length": 24.0, "completions/clipped_ratio": 0.0, "entropy": 0.3,
             "rewards/fields_equal/mean": 0.9, "step": 1},
            {"loss": 0.0, "reward": 3.75, "reward_std": 0.1, "frac_reward_zero_std": 1.0,
             "completions/mean_length": 23.0, "completions/clipped_ratio": 0.25, "entropy": 0.2,
             "rewards/fields_equal/mean": 0.95, "step": 2},
            {"train_runtime": 9.0, "step": 2}]                   # the summary line: not a step
    h = rewards.grpo_history(logs, ["fields_equal", "only_json"])
    assert h["step"] == [1, 2] and h["reward"] == [3.5, 3.75] and h["kl"] == [0.0, None]
    assert h["zero_std_groups"] == [0.5, 1.0] and h["fields_equal"] == [0.9, 0.95] and h["only_json"] == [None, None]


def write_07(tmp_path, n=4, **change):
    m = {"task": {"n": n, "per_item": {"sft_em": [1, 0, 1, 1], "sft_valid": [1, 1, 1, 1], "dpo_em": [1, 1, 0, 1],
                                       "dpo_valid": [1, 1, 1, 0]}},
         "general_text_perplexity": {"before": 20.0, "after": 21.0}, "dpo": {"train_seconds": 12.5},
         "gate": {"kept": "dpo"}, "smoke": False, "model": "smollm2-135m"}
    m.update(change)
    return env.write_json(tmp_path / "metrics.json", m)


def test_dpo_results_reader_is_tolerant(tmp_path):
    assert rewards.load_dpo_run(tmp_path / "none.json", 4)["status"] == "not run"
    ok = rewards.load_dpo_run(write_07(tmp_path), 4)
    assert ok["status"] == "ok" and ok["dpo_em"] == [1, 1, 0, 1] and ok["perplexity"] == {"before": 20.0, "after": 21.0}
    assert ok["train_seconds"] == 12.5 and ok["gate"] == {"kept": "dpo"}
    assert rewards.load_dpo_run(write_07(tmp_path), 3)["status"] == "other items"
    missing = rewards.load_dpo_run(write_07(tmp_path, dpo={}), 4)
    assert missing["status"] == "not run" and "make nb NB=07" in missing["why"]
    path = write_07(tmp_path)
    stale = rewards.load_dpo_run(path, 4, newer_than=path.stat().st_mtime + 1)     # 07 ran before this SFT adapter
    assert stale["status"] == "stale" and "make nb NB=07" in stale["why"]
    assert rewards.load_dpo_run(path, 4, newer_than=path.stat().st_mtime - 1)["status"] == "ok"
    (tmp_path / "metrics.json").write_text("{not json")
    assert rewards.load_dpo_run(tmp_path / "metrics.json", 4)["status"] == "not run"


def test_verdicts_from_p_value_and_sign():
    from scipy import stats

    a = [1] * 20 + [0] * 80
    b = [0] * 18 + [1] * 2 + [1] * 2 + [0] * 78          # A alone right 18×, B alone 2×
    v = evals.paired_verdict(a, b)
    assert v["verdict"] == "worse" and (v["a_only"], v["b_only"]) == (18, 2)
    assert math.isclose(v["p_value"], stats.binomtest(18, 20, 0.5).pvalue)      # the independent oracle
    assert evals.paired_verdict(b, a)["verdict"] == "better"
    assert evals.paired_verdict(a, [0] * 4 + [1] * 16 + [1] * 3 + [0] * 77)["verdict"] == "no significant difference"
    assert evals.paired_verdict(a, a)["verdict"] == "no significant difference"
    rows = rewards.pairwise({"SFT": a, "DPO": b, "GRPO": a})
    assert [(r["a"], r["b"], r["verdict"]) for r in rows] == [("SFT", "DPO", "worse"), ("SFT", "GRPO", "no significant difference"),
                                                              ("DPO", "GRPO", "better")]
