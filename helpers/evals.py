"""Evaluation: the one log-likelihood engine, perplexity, multiple-choice scoring (lm-eval semantics), intervals, tests.

Every log-likelihood here comes from one engine, :func:`target_logprobs`: it batches token sequences, runs the
model once per distinct sequence (in ``helpers.bench.eval_mode``, no gradients) and gathers the log-probs of given
target tokens at given positions. Text perplexity (:func:`token_nll`, :func:`perplexity`: windows, every token
after a window's first is a target) and continuation scoring (:func:`continuation_logprobs`,
:func:`pair_logprobs`, :func:`completion_nll`, :func:`score_mc`) are two ways of asking it.

How lm-eval 0.4.13 scores a multiple-choice item (and how :func:`score_mc` does, step for step):

1. For each choice it asks for log P(continuation | context) with continuation = target_delimiter (" ") + choice.
2. Trailing whitespace of the context moves to the continuation; context + continuation is tokenized as one
   string and split after the context's tokens (so the boundary tokenizes naturally).
3. The model sees (context + continuation)[:-1] (left-truncated to the model's max length + 1); the
   continuation's log-probs are summed.
4. ``acc``: the choice with the highest summed log-prob is the prediction. ``acc_norm``: the same after dividing
   each sum by the choice's length in characters (without the delimiter), which removes the bias to short answers.

Also here: the committed benchmark slices (``data/benchmarks/``), chance rates, Wilson and bootstrap
intervals, McNemar's exact test and a paired bootstrap for base vs fine-tuned (all computed by ``scipy.stats``),
and :func:`lm_eval_mc`, which runs the real lm-eval on the same items for a cross-check.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from helpers import bench, data, env

if TYPE_CHECKING:
    import torch

BENCHMARK_DIR = env.DATA_DIR / "benchmarks"
TASK_YAML_DIR = BENCHMARK_DIR / "lm_eval_tasks"
TASKS = ("arc_easy", "arc_challenge", "boolq", "piqa", "hellaswag", "mmlu")
TASK_LABELS = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge", "boolq": "BoolQ", "piqa": "PIQA",
               "hellaswag": "HellaSwag", "mmlu": "MMLU"}
ITEM_KEYS = ("id", "task", "source_id", "context", "choices", "gold")
DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither config nor tokenizer states a context length
TOKENIZER_INFINITY = 1000000000000000019884624838656  # transformers' "no limit" model_max_length

# ------------------------------------------------------------------------------------------- data


def load_benchmark(task: str, n: int | None = None, folder: str | Path = BENCHMARK_DIR) -> list[dict]:
    """The first `n` items (all if None) of a committed slice, validated against the normalised schema."""
    path = Path(folder) / f"{task}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; regenerate with: python data/benchmarks/make_slices.py")
    items = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if n is not None and len(items) >= n:
                break
            items.append(validate_item(json.loads(line)))
    return items


def validate_item(item: dict) -> dict:
    """Raise ValueError unless `item` has a non-empty context, >= 2 string choices and a gold index among them."""
    missing = [k for k in ("context", "choices", "gold") if k not in item]
    if missing:
        raise ValueError(f"item {item.get('id', '?')} lacks {missing}")
    choices, gold = item["choices"], item["gold"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"item {item.get('id', '?')}: choices must be >= 2 non-empty strings, got {choices!r}")
    if not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise ValueError(f"item {item.get('id', '?')}: gold {gold!r} is not an index into {len(choices)} choices")
    return item


def chance_rate(items: Sequence[dict]) -> float:
    """Expected accuracy of guessing uniformly: the mean of 1 / (number of choices)."""
    return sum(1.0 / len(it["choices"]) for it in items) / len(items)


# ------------------------------------------------------------------------------------------- log-likelihood engine

LogprobRequest = tuple[Sequence[int], int, Sequence[int]]  # (model input ids, start position, target ids)


def _padded_batch(batch: Sequence[tuple[int, ...]], pad_id: int):
    """Right-padded input ids and attention mask (long tensors, on CPU) for a batch of token sequences."""
    import torch

    width = max(len(inp) for inp in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, inp in enumerate(batch):
        ids[row, :len(inp)] = torch.tensor(inp)
        mask[row, :len(inp)] = 1
    return ids, mask


def target_logprobs(model, requests: Sequence[LogprobRequest], batch_size: int = 4, softmax_dtype=None,
                    pad_id: int = 0, longest_first: bool = True, progress: bool = False,
                    guard_4bit: bool = True) -> list[tuple[torch.Tensor, bool]]:
    """The log-likelihood engine: per (input ids, start, targets), the targets' log-probs and if all are greedy.

    The logits at input position start + j predict targets[j] (log-softmax in `softmax_dtype`; None keeps the
    logits' dtype, like lm-eval). Requests with the same input share one forward pass (lm-eval's logits cache).
    Inputs are right-padded with `pad_id` in batches of `batch_size` (padding after the last real token cannot
    change a causal model's earlier outputs), longest first or in the given order. Runs under no_grad in
    ``bench.eval_mode(model, guard_4bit)``. Returns, in request order, (1-D tensor of the targets' log-probs,
    whether every target is the argmax).
    """
    import torch

    groups: dict[tuple[int, ...], list[tuple[int, int, list[int]]]] = {}
    for i, (inp, start, targets) in enumerate(requests):
        if not targets or start < 0 or start + len(targets) > len(inp):
            raise ValueError(f"request {i}: {len(targets)} targets from position {start} do not fit an input of "
                             f"{len(inp)} tokens")
        groups.setdefault(tuple(inp), []).append((i, start, list(targets)))
    inputs = sorted(groups, key=len, reverse=True) if longest_first else list(groups)
    batches = [inputs[k:k + batch_size] for k in range(0, len(inputs), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="log-likelihoods", leave=False)
    device = next(model.parameters()).device
    out: list[tuple[torch.Tensor, bool] | None] = [None] * len(requests)
    # eval mode (dropout off; Phi has resid_pdrop 0.1) as lm-eval does, 4-bit-on-CPU safe (helpers.bench)
    with torch.no_grad(), bench.eval_mode(model, guard_4bit):
        for batch in batches:
            ids, mask = _padded_batch(batch, pad_id)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for row, inp in enumerate(batch):
                for i, start, targets in groups[inp]:
                    logp = torch.log_softmax(logits[row, start:start + len(targets)], dim=-1, dtype=softmax_dtype)
                    target = torch.tensor(targets, device=logp.device)
                    out[i] = (logp.gather(-1, target[:, None])[:, 0], bool((logp.argmax(-1) == target).all()))
    return out  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------- perplexity


def _windows(ids: Sequence[int], max_length: int) -> list[list[int]]:
    """Split one token sequence into consecutive, non-overlapping windows of at most `max_length` tokens."""
    return [list(ids[i:i + max_length]) for i in range(0, len(ids), max_length) if len(ids[i:i + max_length]) > 1]


def token_nll(model, tokenizer, texts: Sequence[str] | str, max_length: int = 512, batch_size: int = 1,
              guard_4bit: bool = True) -> dict:
    """Summed negative log-likelihood (nats) of every predicted token of `texts`, and how many tokens were scored.

    Each text is tokenized as the tokenizer does by default, then cut into non-overlapping windows of
    `max_length` tokens; in each window every token after the first is predicted from those before it in the
    same window (a window's first token is context only). Log-softmax in float32, sums in float64, windows in
    text order. Returns nll_sum, n_tokens, mean_nll, perplexity, n_windows.
    """
    import torch

    if isinstance(texts, str):
        texts = [texts]
    windows = [w for t in texts for w in _windows(tokenizer(t)["input_ids"], max_length)]
    if not windows:
        raise ValueError("no window with at least two tokens: the texts are empty or max_length < 2")
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    res = target_logprobs(model, [(w, 0, w[1:]) for w in windows], batch_size, softmax_dtype=torch.float32,
                          pad_id=pad, longest_first=False, guard_4bit=guard_4bit)
    nll_sum = -sum(float(logp.double().sum()) for logp, _ in res)
    n_tokens = sum(len(w) - 1 for w in windows)
    mean = nll_sum / n_tokens
    return {"nll_sum": nll_sum, "n_tokens": n_tokens, "mean_nll": mean, "perplexity": math.exp(mean),
            "n_windows": len(windows)}


def perplexity(model, tokenizer, texts: Sequence[str] | str, max_length: int = 512, batch_size: int = 1,
               guard_4bit: bool = True) -> float:
    """exp(token-weighted mean NLL) of `texts` (see `token_nll` for windowing); no gradients, eval mode, 4-bit safe."""
    return token_nll(model, tokenizer, texts, max_length, batch_size, guard_4bit)["perplexity"]


# ------------------------------------------------------------------------------------------- scoring


def encode_pair(tokenizer, context: str, continuation: str, move_whitespace: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) exactly as lm-eval's HFLM splits them (see the module docstring).

    move_whitespace=False keeps the context's trailing whitespace (e.g. a chat template's newline) in the
    context: the split a trainer uses between prompt and completion.
    """
    if not context:
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return ([prefix], cont) if prefix != cont[0] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip()) if move_whitespace else 0
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def _encode(tokenizer, text: str) -> list[int]:
    """tokenizer.encode with its default special tokens, except none when the text already starts with BOS."""
    prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prefix = tokenizer.decode(prefix_id) if prefix_id is not None else None
    kwargs = {"add_special_tokens": False} if prefix and text.startswith(prefix) else {}
    return tokenizer.encode(text, **kwargs)


def max_length(model, tokenizer) -> int:
    """The context length lm-eval assumes: config n_positions / max_position_embeddings / n_ctx, else tokenizer."""
    cfg = getattr(model.config, "text_config", None) or model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, attr, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit is not None and limit != TOKENIZER_INFINITY else DEFAULT_MAX_LENGTH


def continuation_logprobs(model, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 4,
                          softmax_dtype=None, progress: bool = False) -> list[tuple[float, bool]]:
    """For each (context, continuation): (summed log-prob of the continuation, whether greedy decoding yields it).

    Requests whose model input is identical (e.g. MMLU's one-token answers " A".." D" after the same question)
    share one forward pass, as lm-eval's logits cache does (see `target_logprobs`).
    `softmax_dtype` None keeps the logits' dtype, like lm-eval.
    """
    pairs = [encode_pair(tokenizer, c, x) for c, x in requests]
    return pair_logprobs(model, pairs, max_length(model, tokenizer), batch_size, softmax_dtype, progress)


def pair_logprobs(model, pairs: Sequence[tuple[list[int], list[int]]], limit: int, batch_size: int = 4,
                  softmax_dtype=None, progress: bool = False) -> list[tuple[float, bool]]:
    """lm-eval's continuation scoring on token ids: [(summed log-prob of cont, is greedy)] per (ctx, cont).

    The model sees (ctx + cont)[:-1], left-truncated to `limit` tokens; inputs go longest first through
    `target_logprobs`.
    """
    requests = []
    for i, (ctx, cont) in enumerate(pairs):
        if not cont or len(cont) > limit:
            raise ValueError(f"request {i}: continuation has {len(cont)} tokens (must be 1..{limit})")
        inp = (list(ctx) + list(cont))[-(limit + 1):][:-1]  # the model predicts token t+1 from tokens <= t
        requests.append((inp, len(inp) - len(cont), cont))
    res = target_logprobs(model, requests, batch_size, softmax_dtype, progress=progress)
    return [(float(logp.sum()), greedy) for logp, greedy in res]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two token lists share (where TRL splits a prompt from its completion)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def completion_nll(model, tokenizer, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 4) -> dict:
    """Held-out loss on completions only: summed and mean NLL (nats/token) of each completion given its prompt.

    As TRL 1.16's SFT does: prompt + completion is tokenized as one string (no extra special tokens) and every
    token from where it diverges from the tokenized prompt on is scored (so a token that merges across the
    boundary counts as completion). Returns nll_sum, n_tokens, mean_nll, perplexity (= exp(mean_nll)).
    """
    import torch

    if len(prompts) != len(completions) or not prompts:
        raise ValueError("need the same, non-zero number of prompts and completions")
    pairs = []
    for p, c in zip(prompts, completions, strict=True):
        ctx = tokenizer.encode(p, add_special_tokens=False)
        whole = tokenizer.encode(p + c, add_special_tokens=False)
        # TRL 1.16: the completion starts where the two token lists diverge (a merged boundary token counts)
        k = min(common_prefix(ctx, whole), len(whole) - 1)
        pairs.append((whole[:k], whole[k:]))
    res = pair_logprobs(model, pairs, max_length(model, tokenizer), batch_size, softmax_dtype=torch.float32)
    nll = -sum(ll for ll, _ in res)
    n = sum(len(c) for _, c in pairs)
    return {"nll_sum": nll, "n_tokens": n, "mean_nll": nll / n, "perplexity": math.exp(nll / n)}


def mc_decision(lls: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(pred, pred_norm): argmax of the raw sums, and of the sums divided by len(choice) in characters."""
    pred = max(range(len(lls)), key=lambda j: (lls[j], -j))  # ties → first index, like numpy.argmax
    norm = [ll / len(c) for ll, c in zip(lls, choices, strict=True)]
    pred_norm = max(range(len(norm)), key=lambda j: (norm[j], -j))
    return pred, pred_norm


def score_mc(model, tokenizer, items: Sequence[dict], batch_size: int = 4, delimiter: str = " ",
             softmax_dtype=None, progress: bool = False, z: float = 1.96) -> dict:
    """Score multiple-choice items like lm-eval: acc, acc_norm, their Wilson intervals, chance and per-item detail."""
    items = [validate_item(it) for it in items]
    if not items:
        raise ValueError("score_mc needs at least one item")
    requests = [(it["context"], delimiter + c) for it in items for c in it["choices"]]
    flat = continuation_logprobs(model, tokenizer, requests, batch_size, softmax_dtype, progress)
    per_item, k = [], 0
    for it in items:
        n_choices = len(it["choices"])
        lls = [ll for ll, _ in flat[k:k + n_choices]]
        k += n_choices
        pred, pred_norm = mc_decision(lls, it["choices"])
        per_item.append({"id": it.get("id"), "lls": lls, "pred": pred, "pred_norm": pred_norm, "gold": it["gold"],
                         "correct": int(pred == it["gold"]), "correct_norm": int(pred_norm == it["gold"])})
    n = len(per_item)
    acc_k = sum(r["correct"] for r in per_item)
    norm_k = sum(r["correct_norm"] for r in per_item)
    return {"n": n, "acc": acc_k / n, "acc_ci": wilson_interval(acc_k, n, z),
            "acc_norm": norm_k / n, "acc_norm_ci": wilson_interval(norm_k, n, z),
            "chance": chance_rate(items), "per_item": per_item}


# ------------------------------------------------------------------------------------------- statistics


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n (95% for z=1.96); stays inside [0, 1], sensible at 0 and n.

    `scipy.stats.binomtest(k, n).proportion_ci(method="wilson")` at the confidence level whose two-sided normal
    quantile is `z` (so z=1.96 gives the textbook numbers, not scipy's 1.959964…).
    """
    from scipy import stats

    if n <= 0:
        raise ValueError("n must be positive")
    if not 0 <= k <= n:
        raise ValueError(f"k={k} must be between 0 and n={n}")
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=2 * stats.norm.cdf(z) - 1, method="wilson")
    return float(ci.low), float(ci.high)


def _percentile_bootstrap(x, stat: Callable, iters: int, level: float, seed: int):
    """scipy's percentile bootstrap of `stat` over `x` (numpy's Generator seeded with `seed`): (low, high, replicates)."""
    import numpy as np
    from scipy import stats

    res = stats.bootstrap((x,), stat, n_resamples=iters, confidence_level=level, method="percentile",
                          rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high), res.bootstrap_distribution


def bootstrap_interval(values: Sequence[float], stat: Callable | None = None, iters: int = 2000,
                       level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `stat` (default: the mean) over resamples of `values` (scipy.stats.bootstrap)."""
    import numpy as np

    lo, hi, _ = _percentile_bootstrap(np.asarray(values, dtype=float), stat or np.mean, iters, level, seed)
    return lo, hi


def mcnemar_exact(a: Sequence[int], b: Sequence[int]) -> dict:
    """McNemar's exact test on paired 0/1 outcomes: only the discordant items count; two-sided binomial p-value.

    The p-value is `scipy.stats.binomtest(a_only, a_only + b_only, 0.5)`'s (1.0 when no item is discordant).
    """
    from scipy import stats

    if len(a) != len(b):
        raise ValueError("paired outcomes must have the same length")
    a_only = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    b_only = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    both = sum(1 for x, y in zip(a, b, strict=True) if x and y)
    m = a_only + b_only
    p = float(stats.binomtest(a_only, m, 0.5).pvalue) if m else 1.0
    return {"n": len(a), "both": both, "a_only": a_only, "b_only": b_only, "neither": len(a) - both - m,
            "diff": (b_only - a_only) / len(a) if len(a) else 0.0, "p_value": p}


def paired_verdict(a_right: Sequence[int], b_right: Sequence[int], alpha: float = 0.05) -> dict:
    """B against A on the same items, from McNemar's exact test and the sign of the difference: "better" or
    "worse" only where p < `alpha`, else "no significant difference"; with the test's counts."""
    test = mcnemar_exact(a_right, b_right)
    if test["p_value"] < alpha and test["b_only"] != test["a_only"]:
        word = "better" if test["b_only"] > test["a_only"] else "worse"
    else:
        word = "no significant difference"
    return {"verdict": word, **test}


def paired_bootstrap(a: Sequence[float], b: Sequence[float], iters: int = 2000, level: float = 0.95,
                     seed: int = 0) -> dict:
    """Mean of b - a over paired items, its percentile bootstrap interval, and a two-sided bootstrap p-value."""
    import numpy as np

    if len(a) != len(b):
        raise ValueError("paired outcomes must have the same length")
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    lo, hi, reps = _percentile_bootstrap(d, np.mean, iters, level, seed)
    # p: how often the resampled difference lands on the other side of 0 (doubled, capped at 1)
    p = 1.0 if d.mean() == 0 else min(1.0, 2 * float(np.mean(reps <= 0) if d.mean() > 0 else np.mean(reps >= 0)))
    return {"diff": float(d.mean()), "ci": (lo, hi), "p_value": p}


def compare_paired(base: dict, tuned: dict, metric: str = "acc", seed: int = 0) -> dict:
    """McNemar exact test + paired bootstrap for two score_mc results on the same items (tuned − base)."""
    key = "correct" if metric == "acc" else "correct_norm"
    ids_a, ids_b = [r["id"] for r in base["per_item"]], [r["id"] for r in tuned["per_item"]]
    if ids_a != ids_b:
        raise ValueError("the two results were not computed on the same items in the same order")
    a = [r[key] for r in base["per_item"]]
    b = [r[key] for r in tuned["per_item"]]
    return {"metric": metric, "mcnemar": mcnemar_exact(a, b), "bootstrap": paired_bootstrap(a, b, seed=seed)}


# ------------------------------------------------------------------------------------------- lm-eval


def task_config(task: str) -> dict:
    """The shipped lm-eval task YAML for a slice (data/benchmarks/lm_eval_tasks/slm_<task>.yaml) as a dict."""
    import yaml

    return yaml.safe_load((TASK_YAML_DIR / f"slm_{task}.yaml").read_text())


def write_task_dir(folder: str | Path, tasks: Sequence[str] = TASKS) -> str:
    """Copy the shipped lm-eval task YAMLs to `folder` with absolute data paths (usable from any working directory)."""
    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        cfg = task_config(task)
        cfg.pop("tag", None)
        cfg["dataset_kwargs"] = {"data_files": {"test": str(BENCHMARK_DIR / f"{task}.jsonl")}}
        (folder / f"slm_{task}.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return str(folder)


def lm_eval_mc(model, tokenizer, items: Sequence[dict], task: str = "arc_easy", batch_size: int = 4,
               quiet: bool = True) -> dict:
    """Run lm-evaluation-harness itself (HFLM on this model object) on exactly `items`, using the shipped YAML.

    Returns {"acc", "acc_norm", "lls": per-item lists of summed log-probs, "ids"} for comparison with score_mc.
    A peft model is passed as its LoRA-injected base model (adapters active), which HFLM accepts.
    quiet=True hides lm-eval's progress bars (they go to stderr); errors still raise.
    """
    import contextlib
    import io
    import tempfile

    import yaml
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    was_training = model.training
    cfg = task_config(task)
    name = f"slm_check_{task}"
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "items.jsonl"
        data.write_text("".join(json.dumps(validate_item(dict(it))) + "\n" for it in items), encoding="utf-8")
        cfg.update(task=name, dataset_kwargs={"data_files": {"test": str(data)}})
        cfg.pop("tag", None)
        (Path(tmp) / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        quieter = contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext()
        try:  # HFLM puts the model in eval mode; put it back as it was
            with quieter:
                lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
                res = simple_evaluate(model=lm, tasks=[name], verbosity="ERROR", log_samples=True, bootstrap_iters=0,
                                      task_manager=TaskManager(include_path=tmp, include_defaults=False))
        finally:
            model.train(was_training)
    samples = sorted(res["samples"][name], key=lambda s: s["doc_id"])
    metrics = res["results"][name]
    return {"acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"], "ids": [s["doc"].get("id") for s in samples],
            "lls": [[float(r[0]) for r in s["filtered_resps"]] for s in samples]}


# ------------------------------------------------------------------------------------------- generation


def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 48, batch_size: int = 16,
             **generate_kwargs) -> list[str]:
    """Greedy completions for already formatted prompts (left-padded batches), special tokens stripped.

    `generate_kwargs` go to `model.generate` (e.g. do_sample=True, num_return_sequences=n: n answers per prompt,
    in prompt order).

    Runs in `helpers.bench.eval_mode`: dropout off, but a 4-bit model on CPU keeps its 4-bit layers out of the
    bitsandbytes repack that would silently stop LoRA gradients in a later training run (docs/sources.md#bnb-cpu-repack).
    """
    import torch

    device = next(model.parameters()).device
    side, pad, outputs = tokenizer.padding_side, tokenizer.pad_token, []
    try:  # the caller's tokenizer is left as it was: padding side and pad token are put back
        tokenizer.padding_side = "left"
        if pad is None:  # Phi-2 has none; padded positions are masked out by the attention mask
            tokenizer.pad_token = tokenizer.eos_token
        with torch.no_grad(), bench.eval_mode(model):
            for i in range(0, len(prompts), batch_size):
                enc = tokenizer(list(prompts[i:i + batch_size]), return_tensors="pt", padding=True,
                                add_special_tokens=False).to(device)
                out = model.generate(**enc, **{"max_new_tokens": max_new_tokens, "do_sample": False,
                                               "pad_token_id": tokenizer.pad_token_id, **generate_kwargs})
                outputs += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad
    return [o.strip() for o in outputs]


def evaluate_task(model, tokenizer, records: Sequence[Mapping], max_new_tokens: int = 48, batch_size: int = 16,
                  style: str = "auto", generate_fn: Callable[[list[str]], list[str]] | None = None) -> dict:
    """Generate answers for held-out task records (chat or prompt/completion) and score them.

    `generate_fn(prompts) -> answers` replaces transformers generation (e.g. a llama.cpp model, notebook 09).
    Returns {"outputs": [generated text], "scores": helpers.data.score_predictions(...)}.
    """
    pairs = [data.split_record(r) for r in records]
    prompts = [data.format_prompt(p, tokenizer, style) for p, _ in pairs]
    if generate_fn is not None:
        outputs = list(generate_fn(prompts))
    else:
        outputs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return {"outputs": outputs, "scores": data.score_predictions(outputs, [a for _, a in pairs])}


def answers_key(adapter_dir: str | Path, prompts: Sequence[str], **settings) -> str:
    """sha256 of the adapter's weight file, the formatted prompts and the generation settings (equal key: equal greedy answers)."""
    found = [p for p in (Path(adapter_dir) / n for n in ("adapter_model.safetensors", "adapter_model.bin")) if p.is_file()]
    if not found:
        raise FileNotFoundError(f"no adapter_model.safetensors in {adapter_dir}: answers_key fingerprints a saved LoRA "
                                "adapter folder (what save_pretrained writes)")
    weights = found[0]
    digest = hashlib.sha256(weights.read_bytes())
    digest.update(json.dumps({"prompts": list(prompts), "settings": settings}, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def save_answers(path: str | Path, key: str, outputs: Sequence[str]) -> Path:
    """Write greedy answers with the answers_key they belong to (JSON), for another notebook to reuse."""
    path = Path(path)
    path.write_text(json.dumps({"key": key, "outputs": list(outputs)}, indent=1, ensure_ascii=False))
    return path


def load_answers(path: str | Path, key: str) -> list[str] | None:
    """The answers saved at `path` under exactly `key`; None when there is no file or it was written for another key."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        stored_key, outputs = saved["key"], saved["outputs"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a file save_answers wrote ({err!r}): delete it, or run the notebook that "
                         "writes it again") from None
    return list(outputs) if stored_key == key else None
