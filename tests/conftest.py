"""Shared test helpers: where ../shared is, and a skip marker for it."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REFERENCE_SPECS = SHARED / "reference-specs"

needs_shared = pytest.mark.skipif(not REFERENCE_SPECS.is_dir(), reason=f"{SHARED} is not present")
