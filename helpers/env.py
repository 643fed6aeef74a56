"""Environment: seeding, device/dtype choice with the reason, versions, hub reachability, paths, tokens.

Bottom of the import graph: imports no other helper module.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import random
import socket
import sys
import time
from dataclasses import dataclass
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
    """Seed Python, NumPy and torch (CPU and CUDA) for reproducible runs."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def cache_dir() -> Path:
    """Where converted offline models live: $SLM_COURSE_CACHE, else ~/.cache/slm-course."""
    root = os.environ.get(CACHE_ENV) or os.path.join(Path.home(), ".cache", "slm-course")
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_dir(name: str | None = None) -> Path:
    """The gitignored output folder ($SLM_COURSE_BUILD or <repo>/build), or its sub-folder `name`."""
    root = Path(os.environ.get(BUILD_ENV) or REPO_ROOT / "build")
    path = root / name if name else root
    path.mkdir(parents=True, exist_ok=True)
    return path


def output_dir(output_dir: str, notebook: str) -> Path:
    """Resolve a notebook's OUTPUT_DIR parameter: "auto" → build/<notebook>/, else the given path."""
    path = build_dir(notebook) if output_dir in ("", "auto", None) else Path(output_dir)
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
        import torch

        return getattr(torch, self.dtype_name)

    def __str__(self) -> str:
        return f"{self.device} ({self.name}), {self.dtype_name}: {self.reason}"


def choose_device(prefer: str = "auto") -> DeviceChoice:
    """Pick device and compute dtype: bf16 on CUDA that supports it, fp16 on older CUDA (T4), fp32 on CPU."""
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
    return DeviceChoice("cpu", "float32", "no CUDA GPU: CPU kernels are fastest and exact in fp32", platform.processor() or "cpu")


def check_dtype_supported(dtype_name: str, device: str) -> None:
    """Raise a clear error if `dtype_name` cannot be used for training on `device` (e.g. bf16 on a T4)."""
    import torch

    if dtype_name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype_name!r}")
    if device.startswith("cuda") and dtype_name == "bfloat16" and not torch.cuda.is_bf16_supported(False):
        raise ValueError(
            f"bf16 is not supported on {torch.cuda.get_device_name(0)} (needs compute capability >= 8.0). "
            "Use float16 (with a GradScaler / fp16=True) or choose_device() to pick for you."
        )
    if device == "cpu" and dtype_name == "float16":
        raise ValueError("float16 training on CPU is unsupported/slow and unstable; use float32 (or bfloat16).")


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


def cpu_cores() -> int:
    """Cores this process may run on (the CPU affinity mask where the OS has one, else os.cpu_count())."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


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


def json_safe(obj):
    """A JSON-writable copy: NaN/inf → None, numpy/torch scalars → Python numbers, paths and tuples handled."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 0) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


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
    """Write `obj` as indented JSON (cleaned by `json_safe`: NaN → null, numpy scalars → numbers; else str())."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(obj), indent=1, default=str))
    return path


RECIPE_TAG = "recipe"


def recipe_sources(notebook: str) -> list[str]:
    """The source of a notebook's cells tagged `recipe` (the code a reader copies), in order, read from notebooks/."""
    import json

    path = REPO_ROOT / "notebooks" / f"{notebook}.ipynb"
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return ["".join(c["source"]) for c in cells
            if c["cell_type"] == "code" and RECIPE_TAG in c.get("metadata", {}).get("tags", [])]
