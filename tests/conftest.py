"""Test-wide settings (never contact a model hub; keep outputs under build/) and the shared tiny-Phi fixtures."""

import os

import pytest

if os.environ.get("SLM_COURSE_ALLOW_HUB") != "1":  # only `make test-gpu` lets notebooks reach the hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
