"""Test-wide settings: never contact a model hub; keep outputs under build/."""

import os

if os.environ.get("SLM_COURSE_ALLOW_HUB") != "1":  # only `make test-gpu` lets notebooks reach the hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
