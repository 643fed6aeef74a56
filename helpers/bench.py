"""Benchmark harness: generation speed, peak memory (RSS on CPU, max allocated on CUDA), timing, footprint, eval_mode.

Log-likelihoods (perplexity, continuation scoring) are evaluation: they live in ``helpers.evals``, which runs its
one engine inside :func:`eval_mode` from here.

4-bit models on CPU and the silent bitsandbytes bug (``docs/sources.md#bnb-cpu-repack``): bitsandbytes 0.50 repacks a
``Linear4bit`` for its CPU inference kernel the first time it runs in eval mode without gradients, and after
that backward no longer reaches LoRA adapters on those layers. Everything here (and in ``helpers.evals``) that
runs a model forward does it inside :func:`eval_mode`, which puts the model in eval mode (dropout off) but, with ``guard_4bit=True`` (the
default), leaves the 4-bit Linear modules themselves flagged as training. Their training flag controls nothing
but that repack, so the numbers are unchanged (computed in the model's own compute dtype), and the model stays
fit for training afterwards. The cost: the repacked kernel can be faster for inference; pass
``guard_4bit=False`` for a throw-away model when you want that speed and will never train it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from helpers import quant


def _device_of(model) -> str:
    try:
        return next(model.parameters()).device.type
    except StopIteration:
        return "cpu"


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


@contextlib.contextmanager
def eval_mode(model, guard_4bit: bool = True) -> Iterator:
    """Run `model` in eval mode (no dropout) and restore every module's mode afterwards.

    With `guard_4bit` on CPU, bitsandbytes 4-bit Linear modules stay flagged as training, so their forward
    does not repack the weights (the silent bug that later starves LoRA of gradients). Use inside no_grad.
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    if guard_4bit and _device_of(model) == "cpu":
        for m in model.modules():
            if quant.is_4bit_linear(m):
                m.training = True
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training


# ------------------------------------------------------------------------------------------- memory


@functools.cache
def _mallinfo2():
    """glibc's `mallinfo2` (≥ 2.33) as a ctypes function, loaded once; None where the C library has none."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(f, ctypes.c_size_t) for f in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    try:
        fn = ctypes.CDLL(None).mallinfo2  # the C library already loaded into this process
    except (OSError, AttributeError):  # macOS, musl, Windows, old glibc
        return None
    fn.restype = MallInfo2
    return fn


def allocator_free_bytes() -> int | None:
    """Bytes glibc's malloc holds freed but not returned to the OS (`mallinfo2().fordblks`); None off glibc."""
    fn = _mallinfo2()
    return None if fn is None else int(fn().fordblks)


def process_memory() -> dict[str, int]:
    """This process on CPU: rss, allocator_free (freed heap glibc keeps; 0 if unknown) and live = rss - allocator_free."""
    import psutil

    rss = psutil.Process().memory_info().rss
    free = allocator_free_bytes() or 0
    return {"rss": rss, "allocator_free": free, "live": rss - free}


class PeakMemory:
    """Peak memory while the block runs: CUDA `max_memory_allocated`; on CPU the process's RSS or live memory,
    sampled every `interval` s.

    ``with PeakMemory() as pm: ...`` then ``pm.peak_bytes`` (highest value seen), ``pm.delta_bytes`` (peak minus
    the value at entry), ``pm.start_bytes``, ``pm.device``, ``pm.kind``. On CPU, `measure="rss"` counts every
    resident byte, including freed memory the allocator keeps (compare deltas); `measure="live"` subtracts the freed
    heap glibc's malloc keeps for reuse (`process_memory`) — the CPU counterpart of CUDA's allocated-not-reserved.
    ``pm.peak_rss_bytes`` is the RSS peak either way. `interval` defaults to 10 ms (RSS) or 50 ms (live: each sample
    walks the allocator's free lists); an allocation shorter than the sampling interval can be missed.
    """

    def __init__(self, device: str = "auto", interval: float | None = None, measure: str = "rss"):
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
        if measure not in ("rss", "live"):
            raise ValueError(f"measure must be 'rss' or 'live', got {measure!r}")
        self.device = device
        self.kind = "max_allocated" if device == "cuda" else measure
        # glibc's mallinfo2 walks the heap's free lists under its lock: at 100 Hz it slowed a CPU training step ~20 %
        self.interval = interval if interval is not None else (0.05 if measure == "live" else 0.01)
        self.start_bytes = self.peak_bytes = self.end_bytes = 0
        self.start_rss_bytes = self.peak_rss_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def delta_bytes(self) -> int:
        """Peak minus the value at entry (bytes)."""
        return self.peak_bytes - self.start_bytes

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            # RSS alone is one read of /proc; mallinfo2 (for live) walks the heap under malloc's lock: only when asked
            now = process_memory() if self.kind == "live" else {"rss": me.memory_info().rss}
            self.peak_bytes = max(self.peak_bytes, now[self.kind])
            self.peak_rss_bytes = max(self.peak_rss_bytes, now["rss"])
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_bytes = self.peak_bytes = torch.cuda.memory_allocated()
            return self
        now = process_memory()
        self.start_bytes = self.peak_bytes = now[self.kind]
        self.start_rss_bytes = self.peak_rss_bytes = now["rss"]
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def as_dict(self) -> dict:
        """device, kind, start_bytes, peak_bytes (+ start/peak RSS on CPU), for metrics.json."""
        out = {"device": self.device, "kind": self.kind, "start_bytes": self.start_bytes, "peak_bytes": self.peak_bytes}
        if self.device == "cpu":
            out.update(start_rss_bytes=self.start_rss_bytes, peak_rss_bytes=self.peak_rss_bytes)
        return out

    def start(self) -> PeakMemory:
        """Start measuring (for a measurement that spans notebook cells; else use `with`)."""
        return self.__enter__()

    def stop(self) -> PeakMemory:
        """Stop measuring; `peak_bytes` holds the peak since `start()`."""
        self.__exit__(None, None, None)
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            self.peak_bytes = max(self.start_bytes, torch.cuda.max_memory_allocated())
            self.end_bytes = torch.cuda.memory_allocated()
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        now = process_memory()
        self.end_bytes = now[self.kind]
        self.peak_bytes = max(self.peak_bytes, self.end_bytes)
        self.peak_rss_bytes = max(self.peak_rss_bytes, now["rss"])

    def __repr__(self) -> str:
        return f"PeakMemory({self.device}: peak {self.peak_bytes / 2**20:,.1f} MiB, delta {self.delta_bytes / 2**20:,.1f} MiB)"


def model_footprint(model, quant_state: bool = True) -> int:
    """Bytes the loaded model holds: `helpers.quant.quantized_linear_bytes`'s total (parameters, buffers and
    bitsandbytes' quant state, shared tensors once); with quant_state=False transformers' `get_memory_footprint()`."""
    return quant.quantized_linear_bytes(model)["total_bytes"] if quant_state else model.get_memory_footprint()


# ------------------------------------------------------------------------------------------- timing


def time_call(fn: Callable[[], object], warmup: int = 1, repeats: int = 3) -> dict:
    """Run `fn` `warmup` times untimed, then `repeats` times timed: {"median", "min", "all" (s), "result" (last)}."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(max(1, repeats)):
        _sync(device)
        t0 = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "all": times, "result": result}


def time_generation(generate: Callable[[int, int], tuple[int, int, str]], n_prompts: int, max_new_tokens: int = 32,
                    warmup: int = 1, repeats: int = 3, warmup_tokens: int = 4) -> dict:
    """The one timing protocol for generation speed, whatever runs the model (transformers here, llama.cpp in 08).

    `generate(i, n)` makes exactly `n` greedy tokens for prompt `i` from a fresh start and returns (prompt tokens,
    new tokens, text). Per repeat and prompt: TTFT = a 1-token call (prefill + first step), total = an n-token call;
    prefill tokens/s = prompt tokens / TTFT; decode tokens/s = (new tokens - 1) / (total - TTFT), so the fixed cost
    of a call cancels out. Medians over `repeats`, after `warmup` untimed passes of `warmup_tokens` tokens (the
    first call pays one-time costs whatever its length). Returns prefill_tokens_per_s, decode_tokens_per_s, ttft_s
    (mean per prompt), total_s (all prompts), prompt_tokens, new_tokens, repeats, texts.
    """
    if max_new_tokens < 2:
        raise ValueError("max_new_tokens must be >= 2 to separate prefill from decoding")
    for _ in range(warmup):
        for i in range(n_prompts):
            generate(i, max(1, min(warmup_tokens, max_new_tokens)))
    runs, texts = [], []
    for _ in range(max(1, repeats)):
        ttft = total = 0.0
        prompt_tokens = new_tokens = 0
        texts = []
        for i in range(n_prompts):
            first = time_call(lambda i=i: generate(i, 1), warmup=0, repeats=1)
            full = time_call(lambda i=i: generate(i, max_new_tokens), warmup=0, repeats=1)
            n_prompt, n_new, text = full["result"]
            ttft, total = ttft + first["median"], total + full["median"]
            prompt_tokens, new_tokens = prompt_tokens + n_prompt, new_tokens + n_new
            texts.append(text)
        runs.append({"prefill_tokens_per_s": prompt_tokens / ttft,
                     # NaN when noise makes the full run no slower than the 1-token run (use warmup >= 1)
                     "decode_tokens_per_s": (new_tokens - n_prompts) / (total - ttft) if total > ttft else math.nan,
                     "ttft_s": ttft / n_prompts, "total_s": total})
    out = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
    out.update(prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=len(runs), texts=texts)
    return out


def generation_speed(model, tokenizer, prompts: Sequence[str] | str, max_new_tokens: int = 32, warmup: int = 1,
                     repeats: int = 3, guard_4bit: bool = True, warmup_tokens: int = 4) -> dict:
    """Greedy generation speed of a transformers model, one prompt at a time, by `time_generation`'s protocol.

    Prompts are tokenized as given (format them, e.g. with a chat template, first); every call makes exactly its
    token count (min_new_tokens). Runs in `eval_mode(model, guard_4bit)`: pass guard_4bit=False to time
    bitsandbytes' faster repacked CPU path on a model you will not train. Keep warmup >= 1: the first call pays
    one-time costs (allocations, bitsandbytes' CPU repack with guard_4bit=False) that would land in TTFT.
    """
    import torch

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [{k: v.to(device) for k, v in tokenizer(p, return_tensors="pt").items()} for p in prompts]
    greedy = dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad)

    def generate(i: int, n: int) -> tuple[int, int, str]:
        n_prompt = encoded[i]["input_ids"].shape[1]
        out = model.generate(**encoded[i], max_new_tokens=n, min_new_tokens=n, **greedy)[0, n_prompt:]
        return n_prompt, int(out.numel()), tokenizer.decode(out, skip_special_tokens=True)

    with torch.no_grad(), eval_mode(model, guard_4bit):
        return time_generation(generate, len(prompts), max_new_tokens, warmup, repeats, warmup_tokens)
