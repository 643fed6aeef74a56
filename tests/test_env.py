"""helpers.env: seeding, device/dtype choice, versions, hub check, tokens, paths."""

import json
import os
import re
import sys

import pytest
import torch

from helpers import env

sys.path.insert(0, str(env.REPO_ROOT / "scripts"))
import colab_setup  # noqa: E402

REQUIREMENTS = env.REPO_ROOT / "requirements.txt"
# `make test-gpu LATEST=1` (the weekly latest-releases lane) installs the newest releases, not the pins: the lane
# prints installed vs pinned itself (.github/workflows/gpu.yml), so the pin checks stand aside there
LATEST_SKIP = "LATEST=1: the latest-releases lane runs unpinned on purpose and reports what changed"


def test_set_seed_reproduces_random_draws():
    env.set_seed(123)
    a = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    env.set_seed(123)
    b = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]


def test_choose_device_on_cpu_is_fp32_with_reason():
    choice = env.choose_device("cpu")
    assert (choice.device, choice.dtype_name, choice.dtype) == ("cpu", "float32", torch.float32)
    assert "CPU" in choice.reason or "no CUDA" in choice.reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_choose_device_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        env.choose_device("cuda")
    with pytest.raises(ValueError, match="auto"):
        env.choose_device("tpu")


def test_check_dtype_supported_rejects_fp16_on_cpu_and_unknown_names():
    env.check_dtype_supported("float32", "cpu")
    with pytest.raises(ValueError, match="float16 training on CPU"):
        env.check_dtype_supported("float16", "cpu")
    with pytest.raises(ValueError, match="float32.*bfloat16.*float16"):
        env.check_dtype_supported("fp8", "cpu")


def _key(name: str) -> str:
    """A distribution name as pip compares them (PEP 503: case and runs of -_. do not matter)."""
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.skipif(os.environ.get("LATEST") == "1", reason=LATEST_SKIP)
def test_versions_are_the_pins_of_requirements_txt():
    pins = {_key(n): v for n, v in colab_setup.pins(REQUIREMENTS).items()}  # scripts/colab_setup.py: the one reader
    installed = env.versions()
    for name in env.STACK:  # the versions every metrics.json records: each pinned, each installed at its pin
        assert _key(name) in pins, f"{name} is recorded but not pinned in requirements.txt"
        assert installed[name].split("+")[0] == pins[_key(name)], (name, installed[name])  # torch: "2.13.0+cpu"


def test_versions_says_missing_for_what_is_not_installed():
    assert env.versions(("surely-not-installed-pkg",))["surely-not-installed-pkg"] == "missing"


def test_hub_reachable_respects_offline_flag(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert env.hub_reachable() is False
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert env.hub_reachable(host="127.0.0.1", port=1, timeout=0.2) is False  # nothing listens on port 1


def test_hf_token_from_environment_then_huggingface_hub(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "token"))   # no saved login
    assert env.hf_token() is None
    (tmp_path / "token").write_text("hf_saved_login")           # `hf auth login` (or Colab Secrets) via get_token
    assert env.hf_token() == "hf_saved_login"
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    assert env.hf_token() == "hf_secret_value"
    assert "hf_secret_value" not in json.dumps(env.env_report(env.choose_device("cpu")))


def test_paths_follow_environment_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv(env.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(env.BUILD_ENV, str(tmp_path / "build"))
    assert env.cache_dir() == tmp_path / "cache" and env.cache_dir().is_dir()
    assert env.output_dir("auto", "00_setup") == tmp_path / "build" / "00_setup"
    assert env.output_dir(str(tmp_path / "mine"), "00_setup") == tmp_path / "mine"


def test_memory_info_is_plausible():
    info = env.memory_info()
    assert 0 < info["ram_available_gib"] <= info["ram_total_gib"] < 10_000


def test_set_cpu_threads_honours_request_else_the_cores_this_process_may_use(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert env.set_cpu_threads(1) == (1, "as asked (CPU_THREADS)") and torch.get_num_threads() == 1
        # the default: one thread per core of the affinity mask (3 cores here: CPUs 0, 3 and 5), no quota
        monkeypatch.setattr(env.os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
        monkeypatch.setattr(env, "cpu_quota", lambda: None)
        assert env.cpu_cores() == 3 and env.set_cpu_threads()[0] == 3 == torch.get_num_threads()
        monkeypatch.setattr(env, "cpu_quota", lambda: 2)  # a container allowed 2 CPUs: the quota caps the mask
        assert env.cpu_cores() == 2 and env.set_cpu_threads()[0] == 2 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("files, cpus", [
    ({"cpu.max": "150000 100000\n"}, 2),               # cgroup v2: 1.5 CPUs of time per period → 2 threads
    ({"cpu.max": "max 100000\n"}, None),               # v2, no limit
    ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),   # v1, no limit
    ({}, None),                                         # no cgroup files (not a container, or not Linux)
])
def test_cpu_quota_reads_the_cgroup_files(tmp_path, files, cpus):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert env.cpu_quota(tmp_path) == cpus


def test_write_metrics_common_keys_first_and_clashes_refused(tmp_path):
    import json
    import math
    import time

    import numpy as np

    dev = env.DeviceChoice("cpu", "float32", "test")
    rec = env.write_metrics(tmp_path, "07_demo", {"loss": np.float32(1.5), "bad": math.nan, "device": "cpu", "p": tmp_path},
                            model="tiny-phi", device=dev, smoke=True, seed=3, started=time.perf_counter() - 2)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == rec and list(saved)[: len(env.COMMON_METRICS)] == list(env.COMMON_METRICS)
    assert saved["loss"] == 1.5 and saved["bad"] is None and saved["p"] == str(tmp_path) and saved["seed"] == 3
    assert 2 <= saved["seconds"] < 60 and saved["threads"] == torch.get_num_threads() and "torch" in saved["versions"]
    with pytest.raises(ValueError, match="model"):
        env.write_metrics(tmp_path, "07_demo", {"model": "other"}, model="tiny-phi", device=dev, smoke=True, seed=0,
                          started=time.perf_counter())


def test_write_json_shares_env_json_safe(tmp_path):
    import math

    import numpy as np

    path = env.write_json(tmp_path / "m.json", {"nan": math.nan, "x": np.float32(2.5), "p": tmp_path})
    assert json.loads(path.read_text()) == {"nan": None, "x": 2.5, "p": str(tmp_path)}
