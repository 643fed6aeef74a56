"""Test-wide settings (never contact a model hub; keep outputs under build/), the shared tiny-Phi fixtures, and
the session's notebook smoke runs (each notebook at most once; 05, 07, 08 and 09 get this session's 04 adapter)."""

import json
import os
import queue
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

if os.environ.get("SLM_COURSE_ALLOW_HUB") != "1":  # only `make test-gpu` lets notebooks reach the hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
SMOKE_OUT = ROOT / "build" / "smoke"   # executed smoke notebooks and what they wrote, kept for inspection
# `make test` never contacts a model hub; `make test-gpu` sets SLM_COURSE_ALLOW_HUB=1 so MODEL="auto" can pick Phi-2.
OFFLINE = {} if os.environ.get("SLM_COURSE_ALLOW_HUB") == "1" else {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# Offline, a fake token (never sent anywhere) proves no notebook prints it; on the GPU lane, the real one if set.
TOKEN = os.environ.get("HF_TOKEN", "") if not OFFLINE else "hf_smokeTestSecretThatMustNeverBePrinted"
SLOW_S = 5.0   # `slow` means: takes longer than this on 2 cores (pytest -m "not slow" is the quick loop)


class IdTokenizer:
    """A 'tokenizer' whose text is space-separated token ids, so tests choose the tokens exactly."""

    pad_token_id = 0
    eos_token_id = 0

    def __call__(self, text, return_tensors=None):
        ids = [int(t) for t in text.split()]
        import torch

        return {"input_ids": torch.tensor([ids]) if return_tensors else ids}


@pytest.fixture(scope="module")
def tiny_dir():
    """A tiny random Phi saved to a folder (built from config by helpers.models; no downloads)."""
    from helpers import models

    return models.build_tiny_phi()


@pytest.fixture
def tiny(tiny_dir):
    """(model, tokenizer) of the tiny Phi in fp32 on CPU, seeded."""
    import torch

    from helpers import models

    torch.manual_seed(0)
    return models.load_model(str(tiny_dir), dtype="float32", device="cpu"), models.load_tokenizer(str(tiny_dir))


def notebook_meta(path: Path) -> dict:
    """A notebook's slm_course metadata (artefacts, timeout, recipe_inputs)."""
    return json.loads(path.read_text(encoding="utf-8"))["metadata"]["slm_course"]


def lane_cores() -> list[set[int]]:
    """The cores of each lane: two lanes splitting the cores this process may use (one lane on a single core, or
    without CPU affinity, as on macOS); SLM_COURSE_TEST_LANES=1 runs one job at a time on all cores."""
    if not hasattr(os, "sched_getaffinity"):
        return [set()]
    cores = sorted(os.sched_getaffinity(0))
    n = max(1, min(int(os.environ.get("SLM_COURSE_TEST_LANES", "2")), len(cores)))
    return [set(cores[i::n]) for i in range(n)]


class Lanes:
    """Jobs that run in a subprocess (notebook and recipe runs), two at a time, each pinned to its lane's cores.

    On 2 cores a smoke run keeps about one core busy (kernel start, imports, tiny models), so two at once, one
    core each, finish sooner than one after the other. A job starts once the jobs it needs are done; pinned,
    a job's kernel counts only its lane's cores (env.cpu_cores), so no two jobs' threads compete for a core.
    """

    def __init__(self) -> None:
        self.free: queue.Queue = queue.Queue()
        for cpus in lane_cores():
            self.free.put(cpus)
        self.pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="lane")
        self.jobs: dict = {}
        self.seconds: dict = {}

    def submit(self, key, job, needs=()):
        """Start `job(cpus)` once the jobs `needs` are done (a no-op if `key` was submitted before)."""
        if key not in self.jobs:
            self.jobs[key] = self.pool.submit(self._run, key, job, [self.jobs[k] for k in needs])
        return self.jobs[key]

    def _run(self, key, job, needs):
        for need in needs:
            need.exception()            # wait; the job itself reports a failed dependency
        cpus = self.free.get()
        t0 = time.perf_counter()
        try:
            return job(cpus or None)
        finally:
            self.seconds[key] = time.perf_counter() - t0
            self.free.put(cpus)

    def wait_all(self) -> None:
        """Return when every submitted job has finished (nothing keeps running into the next test module)."""
        for future in list(self.jobs.values()):
            future.exception()


LANES = Lanes()


class SmokeRuns:
    """Each notebook's papermill smoke run (SMOKE=True, offline) into build/smoke/, at most once per session.

    A notebook that reads another's output — 05, 07, 08 and 09 declare "ADAPTER_DIR": "adapter:04_sft_training" in
    their recipe_inputs — is given that notebook's output from this session's run, by path: never a folder an
    earlier session left behind, and a failed 04 fails them with a message instead of skipping.
    """

    def __init__(self) -> None:
        self.started = time.time()

    @staticmethod
    def needs(path: Path) -> dict[str, str]:
        """{parameter: notebook stem} of the adapters this notebook reads (from its recipe_inputs)."""
        return {name: spec.partition(":")[2] for name, spec in notebook_meta(path).get("recipe_inputs", {}).items()
                if isinstance(spec, str) and spec.startswith("adapter:")}

    def start(self, path: Path):
        """Queue `path`'s smoke run (after the runs it needs); return its future."""
        sys.path.insert(0, str(ROOT / "scripts"))
        from run_notebooks import run_notebook

        needs = self.needs(path)
        for stem in needs.values():
            self.start(ROOT / "notebooks" / f"{stem}.ipynb")

        def job(cpus):
            extra = ["-p", "SMOKE", "True"]
            for name, stem in needs.items():
                extra += ["-p", name, str(self.adapter(stem))]
            return run_notebook(path, SMOKE_OUT, extra, timeout=notebook_meta(path)["timeout"], cpus=cpus,
                                env_extra={**OFFLINE, "HF_TOKEN": TOKEN})

        return LANES.submit(path.stem, job, needs=needs.values())

    def run(self, path: Path):
        """The Result of `path`'s smoke run (queued now if it was not; waits for it)."""
        return self.start(path).result()

    def adapter(self, stem: str) -> Path:
        """The LoRA adapter notebook `stem`'s smoke run wrote in this session (the artefact next to adapter_config.json)."""
        path = ROOT / "notebooks" / f"{stem}.ipynb"
        res = self.run(path)
        if res.status != "ok":
            pytest.fail(f"needs the adapter of {stem}'s smoke run, which {res.status} (see test_notebook_smoke[{stem}])",
                        pytrace=False)
        config = next(a for a in notebook_meta(path)["artefacts"] if a.endswith("adapter_config.json"))
        folder = (SMOKE_OUT / stem / config).parent
        assert (folder / "adapter_config.json").stat().st_mtime >= self.started, f"{folder} is not from this session's run"
        return folder


@pytest.fixture(scope="session")
def smoke_runs() -> SmokeRuns:
    """The session's notebook smoke runs (tests/test_notebooks.py asserts on them; test_recipes.py reuses 04's adapter)."""
    return SmokeRuns()


def selected_params(request, argname: str) -> list:
    """The values of parameter `argname` in this module's tests that this session will run (after -k / -m)."""
    out = []
    for item in request.session.items:
        spec = getattr(item, "callspec", None)
        if item.module is request.module and spec is not None and argname in spec.params:
            out.append(spec.params[argname])
    return out


def pytest_sessionfinish(session):
    """Drop the queued runs nobody will wait for (after -x or Ctrl-C); the two running finish on their own."""
    LANES.pool.shutdown(wait=False, cancel_futures=True)


def pytest_terminal_summary(terminalreporter):
    """The seconds of each subprocess job (the tests that wait for them show waiting time), and the tests whose
    measured time contradicts their marker, so `slow` keeps meaning "over SLOW_S seconds"."""
    if LANES.seconds:
        terminalreporter.write_sep("-", f"notebook and recipe runs, {len(lane_cores())} at a time (seconds each)")
        for key, seconds in sorted(LANES.seconds.items(), key=lambda kv: -kv[1]):
            terminalreporter.write_line(f"{seconds:6.1f} s  {key}")
    reports = [r for r in terminalreporter.stats.get("passed", []) if r.when == "call"]
    unmarked = sorted((r.duration, r.nodeid) for r in reports if r.duration > 2 * SLOW_S and "slow" not in r.keywords)
    if unmarked:
        terminalreporter.write_sep("-", f"took over {2 * SLOW_S:.0f} s without @pytest.mark.slow (mark them)")
        for seconds, nodeid in unmarked[::-1]:
            terminalreporter.write_line(f"{seconds:6.1f} s  {nodeid}")
