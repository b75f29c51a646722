"""Shared test configuration.

``peers`` tests cross-check against torch / transformers. They are skipped when
those are not installed, unless ``REFSSM_REQUIRE_PEERS=1`` (set by ``.ci/run``),
in which case a missing peer is a failure, so CI can never pass by skipping.
"""
from __future__ import annotations

import importlib
import os

import pytest


def require_peer(module: str):
    """Import a peer library, or skip (or fail, when peers are required)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if os.environ.get("REFSSM_REQUIRE_PEERS") == "1":
            pytest.fail(f"peer {module!r} is required (REFSSM_REQUIRE_PEERS=1) but missing: {exc}")
        pytest.skip(f"peer {module!r} not installed (pip install -e .[peers])")
