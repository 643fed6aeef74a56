"""Environment: seeding, device/dtype choice with the reason, versions, hub reachability, paths, tokens.

Bottom of the import graph: imports no other helper module.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import socket
import sys
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
CACHE_ENV = "SLM_COURSE_CACHE"
BUILD_ENV = "SLM_COURSE_BUILD"

STACK = (
    "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets",
    "huggingface_hub", "tokenizers", "safetensors", "gguf", "lm_eval", "llama_cpp_python", "sentencepiece",
    "papermill", "numpy",
)


def set_seed(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) for reproducible runs: `transformers.set_seed`."""
    from transformers import set_seed as hf_set_seed

    hf_set_seed(seed)


def cache_dir() -> Path:
    """Where converted offline models live: $SLM_COURSE_CACHE, else ~/.cache/slm-course."""
    root = os.environ.get(CACHE_ENV) or os.path.join(Path.home(), ".cache", "slm-course")
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_dir(name: str | None = None, smoke: bool = False) -> Path:
    """The gitignored output folder ($SLM_COURSE_BUILD or <repo>/build), or its sub-folder `name`.

    Smoke runs live in a folder of their own named `smoke` (build/smoke/, the tests' folder), so a quick run never
    writes over a full run's results. A relative $SLM_COURSE_BUILD is taken from the repository root.
    """
    root = Path(os.environ.get(BUILD_ENV) or "build")
    root = root if root.is_absolute() else REPO_ROOT / root
    if smoke and root.name != "smoke":
        root = root / "smoke"
    path = root / name if name else root
    path.mkdir(parents=True, exist_ok=True)
    return path


def output_dir(output_dir: str, notebook: str, smoke: bool = False) -> Path:
    """Resolve a notebook's OUTPUT_DIR parameter: "auto" → build/<notebook>/ (build/smoke/<notebook>/ for a smoke
    run), a relative path → inside build/ (the kernel's working directory is notebooks/), else the given path."""
    if output_dir in ("", "auto", None):
        return build_dir(notebook, smoke=smoke)
    path = Path(output_dir).expanduser()
    path = path if path.is_absolute() else build_dir() / path
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class DeviceChoice:
    """Where to run and in which floating-point dtype, with the reason in words."""

    device: str
    dtype_name: str
    reason: str
    name: str = "cpu"

    @property
    def dtype(self):
        """The torch dtype object for `dtype_name`."""
        return torch_dtype(self.dtype_name)

    def __str__(self) -> str:
        return f"{self.device} ({self.name}), {self.dtype_name}: {self.reason}"


DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str):
    """The torch dtype named 'float32' | 'bfloat16' | 'float16'; anything else raises with the accepted names."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, name)


def choose_device(prefer: str = "auto") -> DeviceChoice:
    """THE dtype decision: bf16 on a GPU with native bf16 (compute capability ≥ 8.0), fp16 on older CUDA (a T4),
    fp32 on a CPU.

    `torch.cuda.is_bf16_supported()` alone is not enough: by default it counts emulation and says True on a T4,
    where bf16 runs emulated and slowly; `including_emulation=False` asks for the hardware. Recipe cells inline
    the same expression: ``torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else
    torch.float16`` on CUDA, ``torch.float32`` otherwise (tests/test_hardware.py runs both on simulated cards).
    Apple GPUs (MPS) are not used: the course's 4-bit and training path is CUDA or CPU, so a Mac runs on its CPU.
    """
    import torch

    if prefer not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {prefer!r}")
    if prefer == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but torch sees no CUDA GPU; use 'auto' or 'cpu'.")
    if prefer != "cpu" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        major, minor = torch.cuda.get_device_capability(0)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return DeviceChoice("cuda", "bfloat16", f"compute capability {major}.{minor} has native bf16", name)
        return DeviceChoice(
            "cuda", "float16",
            f"compute capability {major}.{minor} has no native bf16 (e.g. a T4): fp16 with loss scaling", name,
        )
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    why = ("an Apple GPU (MPS) is present but not used: the course's 4-bit and training path is CUDA or CPU; "
           "fp32 on the CPU" if mps else "no CUDA GPU: CPU kernels are fastest and exact in fp32")
    return DeviceChoice("cpu", "float32", why, platform.processor() or "cpu")


def check_dtype_supported(dtype_name: str, device: str) -> None:
    """Raise a clear error if `dtype_name` cannot be used for training on `device` (e.g. bf16 on a T4)."""
    import torch

    torch_dtype(dtype_name)
    if device.startswith("cuda") and dtype_name == "bfloat16" and not torch.cuda.is_bf16_supported(False):
        raise ValueError(
            f"bf16 is not supported on {torch.cuda.get_device_name(0)} (needs compute capability >= 8.0). "
            "Use float16 (with a GradScaler / fp16=True) or choose_device() to pick for you."
        )
    if device == "cpu" and dtype_name == "float16":
        raise ValueError("float16 training on CPU is unsupported/slow and unstable; use float32 (or bfloat16).")


def training_dtype(requested: str | None = None, device: DeviceChoice | None = None) -> str:
    """The dtype a run trains and computes in: `requested` (checked against the hardware), else `choose_device`'s."""
    device = device or choose_device()
    name = requested or device.dtype_name
    check_dtype_supported(name, device.device)
    return name


def versions(packages: tuple[str, ...] = STACK) -> dict[str, str]:
    """Installed versions of the course's stack (plus Python), 'missing' where not installed."""
    out = {"python": sys.version.split()[0]}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def hub_reachable(host: str = "huggingface.co", port: int = 443, timeout: float = 2.0) -> bool:
    """True if the model hub answers a TCP connect within `timeout` s (False when HF_HUB_OFFLINE is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def hf_token() -> str | None:
    """The Hugging Face token (HF_TOKEN, the saved login, or Colab Secrets via `huggingface_hub.get_token`), or None.

    Never print or save it. Colab Secrets are read only inside Colab, where `get_token` asks the notebook for them.
    """
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token
    from huggingface_hub import get_token

    return get_token() or None


def memory_info() -> dict[str, float]:
    """Total/available RAM and, where there is a GPU, total VRAM of GPU 0, in GiB."""
    import psutil
    import torch

    vm = psutil.virtual_memory()
    info = {"ram_total_gib": vm.total / 2**30, "ram_available_gib": vm.available / 2**30}
    if torch.cuda.is_available():
        info["vram_total_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return info


def in_colab() -> bool:
    """True when running inside Google Colab."""
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def env_report(device: DeviceChoice | None = None) -> dict:
    """A JSON-able description of this run's environment (versions, device, dtype, memory)."""
    device = device or choose_device()
    return {
        "versions": versions(),
        "device": device.device,
        "device_name": device.name,
        "dtype": device.dtype_name,
        "dtype_reason": device.reason,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        **{k: round(v, 2) for k, v in memory_info().items()},
    }


def cpu_quota(cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """CPUs a container's CFS quota allows (cgroup v2 `cpu.max` "quota period", v1 cfs_quota_us/period_us), or None."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1") or int(period) <= 0:
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def cpu_cores() -> int:
    """Cores this process may run on: the CPU affinity mask (else os.cpu_count()), capped by a container's quota."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota()
    return max(1, min(n, quota) if quota else n)


def set_cpu_threads(requested: int = 0) -> tuple[int, str]:
    """Set torch's CPU threads: `requested` if > 0, else one per core this process may use; return (n, why).

    Deterministic on purpose: the count depends on the machine, never on what else runs at that moment, and
    notebooks record it. Speeds (tokens/s, s/step) depend on it; losses, perplexities and greedy answers do not,
    beyond float summation order (notebook 05 measures both). On a CPU shared with other busy jobs, OpenMP
    threads spin-waiting for each other can make many threads slower than few: pass a smaller count then.
    """
    import torch

    if requested > 0:
        torch.set_num_threads(requested)
        return requested, "as asked (CPU_THREADS)"
    n = cpu_cores()
    torch.set_num_threads(n)
    return n, f"one per core ({n} cores); CPU_THREADS overrides"


COMMON_METRICS = ("notebook", "model", "device", "dtype", "smoke", "seed", "seconds", "threads", "versions")


def json_safe(obj, where: str = "value"):
    """A JSON-writable copy: NaN/inf → None, numpy/torch scalars → numbers, paths/dtypes/enums → strings.

    Anything else that JSON cannot hold raises TypeError naming where it sits (never silently str()-ed).
    """
    if isinstance(obj, dict):
        return {str(k): json_safe(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [json_safe(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Enum):
        return json_safe(obj.value, where)
    if type(obj).__module__ == "torch" and type(obj).__name__ == "dtype":
        return str(obj).removeprefix("torch.")
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 0) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"{where} is a {type(obj).__name__} ({obj!r:.60}), which JSON cannot hold: convert it first")


def write_metrics(out: Path, notebook: str, metrics: dict, *, model: str, device: DeviceChoice, smoke: bool,
                  seed: int, started: float) -> dict:
    """Write <out>/metrics.json: the common keys every notebook shares (COMMON_METRICS), then the notebook's own.

    `started` is the notebook's time.perf_counter() at its set-up cell; `seconds` is measured from it. A key of
    `metrics` that repeats a common key with another value is an error, not silently overwritten.
    """
    import torch

    common = {"notebook": notebook, "model": str(model), "device": device.device, "dtype": device.dtype_name,
              "smoke": bool(smoke), "seed": seed, "seconds": round(time.perf_counter() - started, 1),
              "threads": torch.get_num_threads(), "versions": versions()}
    clash = {k for k in metrics if k in common and k != "seconds" and json_safe(metrics[k]) != json_safe(common[k])}
    if clash:
        raise ValueError(f"metrics repeat common keys with other values: {sorted(clash)}; rename them")
    record = json_safe({**common, **{k: v for k, v in metrics.items() if k not in common}})
    write_json(Path(out) / "metrics.json", record)
    return record


def write_json(path: str | Path, obj) -> Path:
    """Write `obj` as indented JSON (cleaned by `json_safe`: NaN → null, numpy scalars → numbers; others raise)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(obj, path.name), indent=1))
    return path


RECIPE_TAG = "recipe"


def recipe_sources(notebook: str) -> list[str]:
    """The source of a notebook's cells tagged `recipe` (the code a reader copies), in order, read from notebooks/."""
    import json

    path = REPO_ROOT / "notebooks" / f"{notebook}.ipynb"
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return ["".join(c["source"]) for c in cells
            if c["cell_type"] == "code" and RECIPE_TAG in c.get("metadata", {}).get("tags", [])]
