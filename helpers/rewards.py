"""Verifiable rewards for the course's task and GRPO's bookkeeping (notebook 08); SFT / DPO / GRPO side by side.

A reward here is computed by the task's own checker (`helpers.data`), never by a model: each part is a TRL reward
function, ``f(prompts, completions, **kwargs) -> list[float]``, that `GRPOTrainer` calls with the dataset's other
columns as keyword arguments (``answer``: the record's JSON). Completions arrive as plain strings, or for
conversational prompts as ``[{"role": "assistant", "content": ...}]``: both are accepted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from helpers import data, evals

PARTS = ("parses", "fits_schema", "fields_equal", "only_json")  # the reward's parts, in the order they are summed
LOGGED = {"reward": "reward", "reward_std": "reward_std", "kl": "kl", "zero_std_groups": "frac_reward_zero_std",
          "mean_length": "completions/mean_length", "clipped": "completions/clipped_ratio", "loss": "loss",
          "entropy": "entropy"}  # what GRPOTrainer logs per step (TRL 1.16) → the names used here


def completion_text(completion) -> str:
    """The text of one TRL completion: a plain string, or the content of its last (assistant) message."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], Mapping):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"a completion is a string or a list of messages, not {type(completion).__name__}")


def parses_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 where the completion contains a JSON object (what the task's scorer reads), else 0.0."""
    return [float(data.parse_prediction(completion_text(c)) is not None) for c in completions]


def schema_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 where the parsed object fits the task's schema (`data.schema_problems` finds nothing), else 0.0."""
    return [float(not data.schema_problems(data.parse_prediction(completion_text(c)))) for c in completions]


def field_credit(predicted, answer) -> float:
    """The fraction of the task's fields whose predicted value equals the answer's (0.0 when nothing parsed)."""
    gold = json.loads(answer) if isinstance(answer, str) else dict(answer)
    if not isinstance(predicted, Mapping):
        return 0.0
    missing = object()
    return sum(predicted.get(f, missing) == gold[f] for f in data.TASK_FIELDS) / len(data.TASK_FIELDS)


def fields_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """Partial credit: per completion, the fraction of fields equal to the record's `answer` (a dataset column)."""
    if len(answer) != len(completions):
        raise ValueError(f"{len(answer)} answers for {len(completions)} completions")
    return [field_credit(data.parse_prediction(completion_text(c)), a) for c, a in zip(completions, answer, strict=True)]


def only_json_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 where the completion is one JSON object and nothing else (surrounding whitespace aside), else 0.0."""
    out = []
    for c in completions:
        try:
            out.append(float(isinstance(json.loads(completion_text(c).strip()), dict)))
        except json.JSONDecodeError:
            out.append(0.0)
    return out


REWARD_FUNCS = (parses_reward, schema_reward, fields_reward, only_json_reward)  # the order of PARTS


def reward_parts(completions: Sequence, answers: Sequence) -> dict[str, list[float]]:
    """{part: one reward per completion} for completions and their records' answers (JSON strings)."""
    prompts = [""] * len(completions)
    return {name: f(prompts, list(completions), answer=list(answers)) for name, f in zip(PARTS, REWARD_FUNCS, strict=True)}


def total_reward(completions: Sequence, answers: Sequence, weights: Sequence[float] | None = None) -> list[float]:
    """The weighted sum of the parts per completion, as GRPOTrainer sums them (`reward_weights`; None: all 1.0)."""
    parts = reward_parts(completions, answers)
    weights = list(weights) if weights is not None else [1.0] * len(PARTS)
    if len(weights) != len(PARTS):
        raise ValueError(f"{len(weights)} weights for {len(PARTS)} reward parts {PARTS}")
    return [sum(w * parts[p][i] for w, p in zip(weights, PARTS, strict=True)) for i in range(len(completions))]


# ------------------------------------------------------------------------------------------- groups and logs


def group_stats(rewards: Sequence[float], group_size: int) -> dict[str, float]:
    """Rewards of consecutive groups (one prompt's `group_size` completions): the fraction of groups whose rewards
    are all equal — GRPO's advantage (reward − group mean) is then 0 for every member: no signal — and the mean
    within-group standard deviation (population, as the advantage uses)."""
    if group_size < 2 or len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {group_size} (>= 2)")
    groups = [list(rewards[i:i + group_size]) for i in range(0, len(rewards), group_size)]
    stds = [math.sqrt(sum((r - sum(g) / len(g)) ** 2 for r in g) / len(g)) for g in groups]
    return {"groups": len(groups), "zero_variance": sum(max(g) - min(g) < 1e-9 for g in groups) / len(groups),
            "mean_std": sum(stds) / len(stds), "mean_reward": sum(rewards) / len(rewards)}


def grpo_history(log_history: Sequence[Mapping], parts: Sequence[str] = ()) -> dict[str, list]:
    """Per logged training step of a GRPOTrainer (`trainer.state.log_history`): step, total reward and its std, KL,
    fraction of zero-std groups, mean completion length, clipped ratio, loss, entropy, and each reward function's
    mean (`rewards/<name>/mean`) for the names in `parts`. A key TRL did not log (e.g. kl with beta = 0) is None."""
    logs = [h for h in log_history if "reward" in h and "step" in h]
    out: dict[str, list] = {"step": [h["step"] for h in logs]}
    for name, key in LOGGED.items():
        out[name] = [None if h.get(key) is None else float(h[key]) for h in logs]
    for part in parts:
        out[part] = [None if h.get(f"rewards/{part}/mean") is None else float(h[f"rewards/{part}/mean"]) for h in logs]
    return out


# ------------------------------------------------------------------------------------------- the comparison


def load_dpo_run(path: str | Path, n: int, newer_than: float | None = None) -> dict:
    """Notebook 07's results for the comparison, read tolerantly: {"status": "ok", per-item outcomes, perplexity,
    seconds, gate} or {"status": "not run" | "stale" | "other items", "why": ...} when its metrics file is missing,
    older than `newer_than` (a timestamp: the SFT adapter it should have started from), unreadable, lacks the
    per-item outcomes, or scored a different number of held-out items than `n`."""
    path = Path(path)
    if not path.exists():
        return {"status": "not run", "why": f"{path} does not exist: run notebook 07 (make nb NB=07)"}
    if newer_than is not None and path.stat().st_mtime < newer_than:
        return {"status": "stale", "why": f"{path} is older than the SFT adapter (notebook 07 ran on an earlier one): "
                                          "run notebook 07 again (make nb NB=07)"}
    try:
        m = json.loads(path.read_text())
        items, task = m["task"]["per_item"], m["task"]
        run = {k: [int(x) for x in items[k]] for k in ("sft_em", "sft_valid", "dpo_em", "dpo_valid")}
        ppl, seconds = m["general_text_perplexity"], float(m["dpo"]["train_seconds"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return {"status": "not run", "why": f"{path} lacks what the comparison needs ({type(err).__name__}: {err}): "
                                            "run notebook 07 again (make nb NB=07)"}
    if task.get("n") != n or any(len(v) < n for v in run.values()):
        return {"status": "other items", "why": f"{path} scored {task.get('n')} held-out items, this run {n}: run "
                                                "notebook 07 with the same N_HELDOUT (make nb NB=07)"}
    return {"status": "ok", **{k: v[:n] for k, v in run.items()}, "perplexity": {k: float(ppl[k]) for k in ("before", "after")},
            "train_seconds": seconds, "gate": m.get("gate"), "smoke": m.get("smoke"), "model": m.get("model")}


def pairwise(outcomes: Mapping[str, Sequence[int]], alpha: float = 0.05) -> list[dict]:
    """Every pair of methods (in the given order, B after A) compared with `evals.paired_verdict`: one row per pair."""
    names = list(outcomes)
    return [{"a": a, "b": b, **evals.paired_verdict(outcomes[a], outcomes[b], alpha)}
            for i, a in enumerate(names) for b in names[i + 1:]]
