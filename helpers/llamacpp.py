"""Running a GGUF file with llama.cpp (llama-cpp-python): load, generate, score, time, and compare with transformers (08).

Everything a notebook measures on a GGUF model mirrors what it measures on a transformers model: the same
held-out scoring (`evaluate_task` → ``helpers.evals.evaluate_task``), the same timing protocol
(`generation_speed` → ``helpers.bench.time_generation``), and token-for-token checks that the chat template and
tokenizer inside the file give the ids transformers gives (`template_tokens_match`, `tokenizers_agree`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from helpers import bench, data, evals
from helpers.gguf_file import check_gguf


def load_gguf(path: str | Path, threads: int, n_ctx: int = 1024, **kwargs):
    """A `llama_cpp.Llama` on the CPU for a checked GGUF file, with `threads` threads for prompt and decode."""
    from llama_cpp import Llama

    check_gguf(path)
    return Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_gpu_layers=0,
                 verbose=False, **kwargs)


def complete(llm, prompt: str | Sequence[int], max_new_tokens: int, ban_eos: bool = False) -> dict:
    """Greedy completion (temperature 0) from a fresh context: {"text", "finish_reason", "tokens", "prompt_tokens"}."""
    llm.reset()  # no reuse of the previous prompt's KV cache: every call pays its own prefill
    bias = {llm.token_eos(): -1e9} if ban_eos else None
    out = llm.create_completion(prompt, max_tokens=max_new_tokens, temperature=0.0, logit_bias=bias)
    choice = out["choices"][0]
    return {"text": choice["text"], "finish_reason": choice["finish_reason"], "tokens": out["usage"]["completion_tokens"],
            "prompt_tokens": out["usage"]["prompt_tokens"]}


def evaluate_task(llm, tokenizer, records: Sequence[Mapping], max_new_tokens: int = 48) -> dict:
    """`helpers.evals.evaluate_task` for a GGUF model: the same prompts (formatted by `tokenizer`), greedy, scored alike."""
    runs: list[dict] = []

    def answer(prompts: list[str]) -> list[str]:
        runs.extend(complete(llm, p, max_new_tokens) for p in prompts)
        return [r["text"].strip() for r in runs]

    result = evals.evaluate_task(None, tokenizer, records, generate_fn=answer)
    return {**result, "finish_reasons": [r["finish_reason"] for r in runs]}


def generation_speed(llm, prompts: Sequence[str] | str, max_new_tokens: int = 32, warmup: int = 1, repeats: int = 3,
                     warmup_tokens: int = 4) -> dict:
    """`helpers.bench.generation_speed` for a GGUF model: the same protocol (`bench.time_generation`), the same keys.

    Each timed call is a fresh greedy completion with EOS banned, so it makes exactly the tokens asked for (what
    transformers' min_new_tokens does there).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)

    def generate(i: int, n: int) -> tuple[int, int, str]:
        out = complete(llm, prompts[i], n, ban_eos=True)
        return out["prompt_tokens"], out["tokens"], out["text"]

    return bench.time_generation(generate, len(prompts), max_new_tokens, warmup, repeats, warmup_tokens)


# ------------------------------------------------------------------------------------- the template and tokenizer


def chat_prompt(llm, messages: Sequence[Mapping]) -> str:
    """The prompt text the GGUF's embedded chat template gives (llama-cpp-python's Jinja2 formatter, as in chat)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise ValueError("this GGUF has no tokenizer.chat_template: the model's tokenizer had none when converted")
    eos, bos = llm.token_eos(), llm.token_bos()
    text = Jinja2ChatFormatter(template, eos_token=llm.detokenize([eos], special=True).decode() if eos >= 0 else "",
                               bos_token=llm.detokenize([bos], special=True).decode() if bos >= 0 else "")
    return text(messages=[dict(m) for m in messages]).prompt


def template_tokens_match(llm, tokenizer, conversations: Sequence[Sequence[Mapping]]) -> list[dict]:
    """For each conversation: the GGUF's template + llama.cpp's tokenizer vs tokenizer.apply_chat_template, by token id.

    A model without a chat template (Phi-2's Instruct/Output format) has none in the GGUF either: then the prompt
    text `helpers.data.format_prompt` builds is tokenized by both tokenizers instead.
    """
    rows = []
    chat = bool(getattr(tokenizer, "chat_template", None))
    for messages in conversations:
        if chat:
            ref = tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True, tokenize=True,
                                                return_dict=False)
            ref = list(ref["input_ids"] if isinstance(ref, Mapping) else ref)
            text = chat_prompt(llm, messages)
        else:
            if llm.metadata.get("tokenizer.chat_template"):
                raise ValueError("the GGUF has a chat template but the tokenizer has none: they do not belong together")
            text = data.format_prompt([dict(m) for m in messages], tokenizer)
            ref = tokenizer(text, add_special_tokens=False)["input_ids"]
        ours = llm.tokenize(text.encode(), add_bos=False, special=True)
        first = next((i for i, (a, b) in enumerate(zip(ref, ours, strict=False)) if a != b), min(len(ref), len(ours)))
        rows.append({"same": ref == ours, "template": "chat template in the GGUF" if chat else "Instruct/Output text",
                     "tokens": len(ref), "gguf_tokens": len(ours), "first_difference": None if ref == ours else first})
    return rows


def tokenizers_agree(llm, tokenizer, texts: Sequence[str]) -> bool:
    """True if llama.cpp's tokenizer (from the GGUF) gives the same ids as the transformers tokenizer on every text."""
    return all(llm.tokenize(t.encode(), add_bos=False, special=True) == tokenizer(t, add_special_tokens=False)["input_ids"]
               for t in texts)
