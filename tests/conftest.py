"""Test setup shared by the whole suite.

Triton kernels run compiled where CUDA exists and in the Triton interpreter elsewhere; the interpreter must be chosen
before any kernel is defined, so this happens at import time, before zokernels is imported by a test module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _offline_hf_home(tmp_path_factory, monkeypatch):
    """No test may reach a hub or write to the user's cache."""
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
