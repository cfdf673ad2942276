"""Shared test setup.

HF_ENDPOINT is pointed at a local port reserved here, before anything imports huggingface_hub or datasets
(both read it at import time); the Hub emulator in tests/hub_emulator.py serves that port when a test asks
for it. Nothing in the suite can reach the real Hub.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest


def _reserve_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HUB_PORT = int(os.environ.get("COVTOKEN_TEST_HUB_PORT") or _reserve_port())
os.environ["COVTOKEN_TEST_HUB_PORT"] = str(HUB_PORT)
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{HUB_PORT}"
os.environ.setdefault("HF_TOKEN", "hf_test_token_not_a_secret")
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_EXPERIMENTAL_WARNING", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

REALDATA = Path(os.environ.get("COVTOKEN_REALDATA", REPO_ROOT.parent / "shared" / "realdata"))
REFERENCE = Path(os.environ.get("COVTOKEN_REFERENCE", REPO_ROOT.parent / "shared" / "reference"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def realdata() -> Path:
    """../shared/realdata, or a skip that says why."""
    if not REALDATA.is_dir():
        pytest.skip(f"real-data samples not found at {REALDATA} (set COVTOKEN_REALDATA)")
    return REALDATA


@pytest.fixture(scope="session")
def reference() -> Path:
    """../shared/reference, or a skip that says why."""
    if not REFERENCE.is_dir():
        pytest.skip(f"reference fixtures not found at {REFERENCE} (set COVTOKEN_REFERENCE)")
    return REFERENCE
