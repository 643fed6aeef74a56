"""Preference pairs for the course's task (notebook 07): build, validate, render for DPO; DPOConfig assembly.

A pair is ``{"prompt", "chosen", "rejected"}`` in one of TRL's two forms:

- plain:          ``prompt`` a string (already formatted for the model), ``chosen``/``rejected`` strings;
- conversational: ``prompt`` a list of messages, ``chosen``/``rejected`` lists of assistant messages.

An optional ``kind`` string says where the rejected answer came from (``model`` = the SFT model's own wrong
answer, else the near-miss kind). ``read_pairs`` / ``validate_pairs`` stop a bad row with
:class:`helpers.data.DataFormatError` naming the file, row and field, like notebook 04's loader.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from helpers import data, evals

PAIR_FIELDS = ("prompt", "chosen", "rejected")
NEAR_MISS_KINDS = ("wrong_room", "wrong_device", "wrong_value", "missing_time", "invalid_json", "extra_chatter",
                   "missing_eos")
CHATTER_BEFORE = ("Sure! Here is the JSON: ", "Here you go:\n", "Of course. ", "OK, ")
CHATTER_AFTER = (" Let me know if you need anything else!", "\nI hope this helps.", " Done!", " (as requested)")


# ------------------------------------------------------------------------------------------- near-misses


def _dump(obj: Mapping) -> str:
    """The task's compact JSON, as in the training data (helpers.data.task_record)."""
    return json.dumps(dict(obj), separators=(",", ":"))


def near_miss(answer: str, kind: str, rng: random.Random) -> str | None:
    """A realistic wrong answer of `kind` for the correct JSON `answer`, or None where the kind does not apply.

    One field wrong but valid (wrong_room, wrong_device, wrong_value, missing_time), broken JSON
    (invalid_json), the right JSON wrapped in chatter (extra_chatter), the right JSON not followed by EOS but by
    more text (missing_eos: the model runs on instead of stopping).
    """
    target = json.loads(answer)
    if kind == "wrong_room":
        return _dump({**target, "room": rng.choice(sorted(set(data.ROOMS) - {target["room"]}))})
    if kind == "wrong_device":
        return _dump({**target, "device": rng.choice(sorted(set(data.DEVICES) - {target["device"]}))})
    if kind == "wrong_value":
        lo, hi, step = data.DEVICES[target["device"]][1]
        if target["value"] is None:  # on/off carry no value: inventing one is the realistic slip
            return _dump({**target, "value": rng.randrange(lo, hi + 1, step)})
        others = [v for v in range(lo, hi + 1, step) if v != target["value"]]
        return _dump({**target, "value": rng.choice(others)})
    if kind == "missing_time":
        return None if target["time"] is None else _dump({**target, "time": None})
    if kind == "invalid_json":
        how = rng.randrange(3)
        if how == 0:
            return answer[:-1]                                      # unclosed object
        if how == 1:
            return answer.replace('"', "'")                         # Python-style quotes
        return answer.replace(",", " ", 1)                          # a missing comma
    if kind == "extra_chatter":
        return rng.choice(CHATTER_BEFORE) + answer + rng.choice(CHATTER_AFTER)
    if kind == "missing_eos":
        return answer + "\n" + answer                               # keeps going where it should have stopped
    raise ValueError(f"unknown near-miss kind {kind!r}; known: {NEAR_MISS_KINDS}")


# ------------------------------------------------------------------------------------------- the model's own failures


def sample_answers(model, tokenizer, prompts: Sequence[str], n_samples: int = 4, temperature: float = 1.0,
                   max_new_tokens: int = 40, batch_size: int = 16, seed: int = 0) -> list[list[str]]:
    """`n_samples` sampled completions per formatted prompt (seeded without touching the global RNG, left-padded
    batches, special tokens stripped)."""
    import torch

    with torch.random.fork_rng():  # seeded here; the caller's random stream (CPU and CUDA) is left as it was
        torch.manual_seed(seed)
        flat = evals.generate(model, tokenizer, prompts, max_new_tokens, batch_size, do_sample=True,
                              temperature=temperature, top_k=0, top_p=1.0, num_return_sequences=n_samples)
    return [flat[j:j + n_samples] for j in range(0, len(flat), n_samples)]


def wrong_answers(samples: Sequence[str], answer: str) -> list[str]:
    """The distinct samples that are not exactly the correct record (parsed as the task's scorer parses them)."""
    gold, seen, out = json.loads(answer), set(), []
    for s in samples:
        if not s.strip() or s.strip() == answer or s in seen:
            continue
        if data.parse_prediction(s) == gold and s.strip() != answer:
            continue  # right record with text around it: scored right; near-misses cover chatter explicitly
        seen.add(s)
        out.append(s)
    return out


# ------------------------------------------------------------------------------------------- building pairs


def build_pairs(records: Sequence[Mapping], failures: Sequence[Sequence[str]] | None = None,
                near_misses_per_prompt: int = 1, kinds: Sequence[str] = NEAR_MISS_KINDS, max_failures: int = 2,
                seed: int = 0) -> list[dict]:
    """Conversational pairs from chat task records: chosen = the record's answer; rejected = up to `max_failures`
    of the model's own wrong answers for that prompt (`failures[i]`), plus `near_misses_per_prompt` near-misses
    of kinds drawn (seeded) from `kinds`. Every pair carries `kind`."""
    if failures is not None and len(failures) != len(records):
        raise ValueError(f"{len(failures)} failure lists for {len(records)} records")
    rng = random.Random(f"prefs-{seed}")
    pairs = []
    for i, rec in enumerate(records):
        prompt, answer = data.split_record(rec)
        if not isinstance(prompt, list):
            raise ValueError(f"record {i}: build_pairs needs chat records (messages), got a plain prompt")
        rejected: list[tuple[str, str]] = [(w, "model") for w in (failures[i] if failures else [])[:max_failures]]
        for kind in rng.sample(list(kinds), len(kinds)):
            if sum(k != "model" for _, k in rejected) >= near_misses_per_prompt:
                break
            text = near_miss(answer, kind, rng)
            if text is not None and text != answer:
                rejected.append((text, kind))
        for text, kind in rejected:
            pairs.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": answer}],
                          "rejected": [{"role": "assistant", "content": text}], "kind": kind})
    return pairs


def is_right(text: str, answer: str) -> bool:
    """The task's own checker: the text parses to exactly the record's answer (what exact match scores)."""
    return data.parse_prediction(text) == json.loads(answer)


def on_policy_pairs(records: Sequence[Mapping], samples: Sequence[Sequence[str]], max_rejected: int = 2) -> list[dict]:
    """Conversational pairs from the model's own samples, labelled by the task's checker: chosen = the model's own
    right answer (kind "on-policy"), or the record's answer when no sample was right ("gold chosen"); rejected = up
    to `max_rejected` distinct wrong samples. A prompt whose samples were all right gives no pair."""
    if len(samples) != len(records):
        raise ValueError(f"{len(samples)} sample lists for {len(records)} records")
    pairs = []
    for rec, outs in zip(records, samples, strict=True):
        prompt, answer = data.split_record(rec)
        if not isinstance(prompt, list):
            raise ValueError("on_policy_pairs needs chat records (messages), got a plain prompt")
        right = [s.strip() for s in outs if is_right(s, answer) and s.strip()]
        wrong = list(dict.fromkeys(s.strip() for s in outs if s.strip() and not is_right(s, answer)))
        chosen, kind = (right[0], "on-policy") if right else (answer, "gold chosen")
        for text in wrong[:max_rejected]:
            pairs.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                          "rejected": [{"role": "assistant", "content": text}], "kind": kind})
    return pairs


def token_difference(a: Sequence[int], b: Sequence[int]) -> int:
    """How many tokens differ between two token sequences: the larger side of every non-matching block of a
    `difflib` alignment, summed (0: identical; 1: one token replaced, inserted or deleted)."""
    import difflib

    ops = difflib.SequenceMatcher(a=list(a), b=list(b), autojunk=False).get_opcodes()
    return sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in ops if tag != "equal")


def drop_near_identical(pairs: Sequence[Mapping], tokenizer, min_tokens: int = 2) -> tuple[list[dict], list[dict]]:
    """Split pairs into (kept, dropped): a pair whose chosen and rejected answers differ in fewer than `min_tokens`
    tokens is near-identical — the case where DPO lowers the chosen answer's likelihood too (likelihood
    displacement, Razin et al. 2024, arXiv:2410.08847)."""
    kept, dropped = [], []
    for p in pairs:
        ids = [tokenizer(_text(p[k]), add_special_tokens=False)["input_ids"] for k in ("chosen", "rejected")]
        (kept if token_difference(*ids) >= min_tokens else dropped).append(dict(p))
    return kept, dropped


def acceptance_gate(sft_right: Sequence[int], tuned_right: Sequence[int], alpha: float = 0.05) -> dict:
    """Keep the tuned adapter unless it is significantly worse than SFT on the same items (McNemar's exact test,
    two-sided at `alpha`, and fewer right answers): {"kept": "tuned" | "sft", "p_value", "sft_only", "tuned_only"}."""
    test = evals.paired_verdict(sft_right, tuned_right, alpha)
    return {"kept": "sft" if test["verdict"] == "worse" else "tuned", "p_value": test["p_value"], "sft_only": test["a_only"],
            "tuned_only": test["b_only"], "alpha": alpha, "n": len(sft_right)}


def to_plain(pairs: Sequence[Mapping], tokenizer, style: str = "auto") -> list[dict]:
    """Conversational pairs → plain strings exactly as notebook 04 trained: `data.format_example` for both answers
    (the model's chat template or Instruct/Output, EOS appended), so DPO sees SFT's prompt and stop token."""
    out = []
    for p in pairs:
        if isinstance(p["prompt"], str):
            out.append({k: p[k] for k in PAIR_FIELDS})
            continue
        good = data.format_example({"messages": [*p["prompt"], *p["chosen"]]}, tokenizer, style)
        bad = data.format_example({"messages": [*p["prompt"], *p["rejected"]]}, tokenizer, style)
        out.append({"prompt": good["prompt"], "chosen": good["completion"], "rejected": bad["completion"]})
    return out


def kind_counts(pairs: Iterable[Mapping]) -> dict[str, int]:
    """How many pairs of each `kind`."""
    counts: dict[str, int] = {}
    for p in pairs:
        counts[p.get("kind", "?")] = counts.get(p.get("kind", "?"), 0) + 1
    return dict(sorted(counts.items()))


# ------------------------------------------------------------------------------------------- validation


def _text(content) -> str:
    """The text of a plain answer or of a list of messages (joined), for comparisons."""
    return content if isinstance(content, str) else "\n".join(m.get("content", "") for m in content)


def _check_messages(path: str, row: int, field: str, value, roles: Sequence[str]) -> None:
    """A non-empty list of {"role", "content"} messages with roles in `roles`, non-empty string contents."""
    if not isinstance(value, list) or not value:
        raise data.DataFormatError(path, row, field, f"expected a non-empty list of messages, got {type(value).__name__}")
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise data.DataFormatError(path, row, f"{field}[{j}]", f"expected an object, got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise data.DataFormatError(path, row, f"{field}[{j}].{key}", "missing")
        if m["role"] not in roles:
            raise data.DataFormatError(path, row, f"{field}[{j}].role", f"{m['role']!r} is not one of {tuple(roles)}")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise data.DataFormatError(path, row, f"{field}[{j}].content", "expected a non-empty string")


def validate_pair(obj, row: int, path: str = "<pairs>", form: str | None = None,
                  heldout_requests: Iterable[str] = (), eos: str | None = None) -> str:
    """Check one pair row; return its form ('plain' or 'conversational'); raise DataFormatError naming row and field."""
    if not isinstance(obj, dict):
        raise data.DataFormatError(path, row, None, f"expected an object, got {type(obj).__name__}")
    for field in PAIR_FIELDS:
        if field not in obj:
            raise data.DataFormatError(path, row, field, f"missing (a pair needs {', '.join(PAIR_FIELDS)})")
    this = "plain" if isinstance(obj["prompt"], str) else "conversational"
    if form is not None and this != form:
        raise data.DataFormatError(path, row, "prompt", f"this row is {this} but the file started {form}")
    if this == "plain":
        for field in PAIR_FIELDS:
            if not isinstance(obj[field], str) or not obj[field].strip():
                raise data.DataFormatError(path, row, field, f"expected a non-empty string, got {obj[field]!r:.40}")
    else:
        _check_messages(path, row, "prompt", obj["prompt"], data.ROLES)
        if obj["prompt"][-1]["role"] == "assistant":
            raise data.DataFormatError(path, row, "prompt", "the prompt ends with an assistant turn: the answer "
                                       "belongs in chosen/rejected")
        for field in ("chosen", "rejected"):
            _check_messages(path, row, field, obj[field], ("assistant",))
    if "kind" in obj and not isinstance(obj["kind"], str):
        raise data.DataFormatError(path, row, "kind", f"expected a string, got {type(obj['kind']).__name__}")
    chosen, rejected = _text(obj["chosen"]).strip(), _text(obj["rejected"]).strip()
    if eos:  # TRL appends EOS to plain answers that lack it: "x" and "x<eos>" are the same answer to it
        chosen, rejected = chosen.removesuffix(eos).strip(), rejected.removesuffix(eos).strip()
    if chosen == rejected:
        raise data.DataFormatError(path, row, "rejected", "identical to chosen: the pair teaches nothing")
    held = set(heldout_requests)
    if held:
        prompt = obj["prompt"]
        users = [m["content"] for m in prompt if m["role"] == "user"] if this == "conversational" else []
        if any(u in held for u in users) or (this == "plain" and any(h in prompt for h in held)):
            raise data.DataFormatError(path, row, "prompt", "a held-out request: it would leak the evaluation set")
    return this


def validate_pairs(rows: Sequence, path: str = "<pairs>", heldout_requests: Iterable[str] = (),
                   eos: str | None = None) -> str:
    """Check every pair row (1-based row numbers); all rows in one form, which is returned."""
    if not rows:
        raise data.DataFormatError(path, None, None, "no pairs")
    held, form = set(heldout_requests), None
    for row, obj in enumerate(rows, start=1):
        form = validate_pair(obj, row, path, form, held, eos)
    return form


def read_pairs(path: str | Path, heldout_requests: Iterable[str] = (), eos: str | None = None) -> list[dict]:
    """Parse and validate a .jsonl (one pair per line) or .json (an array) pairs file (`helpers.data.numbered_rows`:
    rows are line numbers of a .jsonl file)."""
    numbered = data.numbered_rows(path)
    held, form = set(heldout_requests), None
    for row, obj in numbered:
        form = validate_pair(obj, row, str(path), form, held, eos)
    return [obj for _, obj in numbered]


def user_requests(records: Iterable[Mapping]) -> set[str]:
    """The user turns of chat task records (e.g. the held-out requests, which must never enter the pairs)."""
    return {m["content"] for r in records for m in data.split_record(r)[0] if m["role"] == "user"}


# ------------------------------------------------------------------------------------------- training


def pair_lengths(plain_pairs: Sequence[Mapping], tokenizer) -> dict[str, list[int]]:
    """Tokens of prompt, prompt+chosen and prompt+rejected per plain pair (what DPOConfig.max_length must hold)."""
    enc = lambda texts: [len(x) for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]  # noqa: E731
    return {"prompt": enc(p["prompt"] for p in plain_pairs),
            "chosen": enc(p["prompt"] + p["chosen"] for p in plain_pairs),
            "rejected": enc(p["prompt"] + p["rejected"] for p in plain_pairs)}


def dpo_config(output_dir: str | Path, device: str = "cpu", dtype: str = "float32", beta: float = 0.1,
               learning_rate: float = 5e-5, max_steps: int = 20, batch_size: int = 4, grad_accum: int = 1,
               max_length: int = 256, seed: int = 0, warmup_steps: float = 0.0, logging_steps: int = 1,
               activation_checkpointing: bool = False, loss_type: Sequence[str] = ("sigmoid", "sft"),
               loss_weights: Sequence[float] | None = (1.0, 1.0)):
    """A TRL `DPOConfig` with every choice explicit: precision from the device (TRL 1.16 defaults to bf16, which a
    CPU refuses), no checkpoint saving, no reporting, DPO's sigmoid loss plus an SFT term, dropout off."""
    from trl import DPOConfig

    from helpers import train  # lazily: it imports peft and transformers' trainer

    return DPOConfig(
        output_dir=str(output_dir), beta=beta, loss_type=list(loss_type),
        loss_weights=list(loss_weights) if loss_weights else None, learning_rate=learning_rate,
        max_steps=max_steps, per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
        max_length=max_length, seed=seed, warmup_steps=warmup_steps, lr_scheduler_type="constant",
        logging_steps=logging_steps, save_strategy="no", report_to="none", disable_dropout=True,
        activation_checkpointing=activation_checkpointing, dataloader_num_workers=0,
        **train.precision_flags(device, dtype),  # the same bf16/fp16/use_cpu rule as SFT (helpers.train)
    )


def reward_history(trainer) -> dict[str, list[float]]:
    """Per logged step: DPO loss, reward margin (chosen − rejected), preference accuracy, chosen/rejected rewards,
    and the policy's mean summed log-probability of the chosen and rejected answers (`logps/chosen`, `logps/rejected`)."""
    logs = [h for h in trainer.state.log_history if "rewards/margins" in h]
    keys = {"loss": "loss", "margin": "rewards/margins", "accuracy": "rewards/accuracies",
            "chosen": "rewards/chosen", "rejected": "rewards/rejected", "logps_chosen": "logps/chosen",
            "logps_rejected": "logps/rejected"}
    return {"step": [h["step"] for h in logs], **{k: [float(h[v]) for h in logs] for k, v in keys.items()}}


def pair_margins(model, tokenizer, plain_pairs: Sequence[Mapping], beta: float, ref_adapter: str | None = "ref",
                 batch_size: int = 8) -> list[float]:
    """DPO's implicit reward margin per plain pair, β·[(log π − log π_ref)(chosen) − (log π − log π_ref)(rejected)].

    π is the PeftModel's active adapter, π_ref its `ref_adapter` (TRL's frozen copy; None: adapters disabled).
    Summed log-probabilities of the answer tokens, split from the prompt as TRL 1.16 splits them (where the
    tokenized prompt stops being a prefix of both prompt+chosen and prompt+rejected). 0 for every pair when π = π_ref.
    """
    from trl.trainer.utils import use_adapter

    seqs = []
    for p in plain_pairs:
        enc = [tokenizer(t, add_special_tokens=False)["input_ids"]
               for t in (p["prompt"], p["prompt"] + p["chosen"], p["prompt"] + p["rejected"])]
        k = min(evals.common_prefix(enc[0], enc[1]), evals.common_prefix(enc[0], enc[2]))
        seqs += [(enc[1][:k], enc[1][k:]), (enc[2][:k], enc[2][k:])]
    limit = evals.max_length(model, tokenizer)
    policy = [ll for ll, _ in evals.pair_logprobs(model, seqs, limit, batch_size)]
    with use_adapter(model, ref_adapter):
        ref = [ll for ll, _ in evals.pair_logprobs(model, seqs, limit, batch_size)]
    ratio = [a - b for a, b in zip(policy, ref, strict=True)]
    return [beta * (ratio[i] - ratio[i + 1]) for i in range(0, len(ratio), 2)]
