"""The timm floor in pyproject.toml is real: CI reruns the core tests with exactly that version (.ci/run)."""
import os
import re
from pathlib import Path

import timm

ROOT = Path(__file__).resolve().parents[1]


def _floor() -> tuple[int, ...]:
    spec = re.search(r'"timm>=([\d.]+)"', (ROOT / "pyproject.toml").read_text())  # the one timm requirement
    return tuple(int(x) for x in spec.group(1).split("."))


def _version() -> tuple[int, ...]:
    return tuple(int(x) for x in re.match(r"[\d.]+", timm.__version__).group(0).rstrip(".").split("."))


def test_installed_timm_meets_the_floor():
    assert _version() >= _floor()
    if os.environ.get("VITPRUNE_FAST_TIMM_FLOOR_RUN") == "1":  # the CI rerun must really use the floor
        assert _version() == _floor(), f"floor run imported timm {timm.__version__} from {timm.__file__}"


def test_ci_reruns_core_tests_at_the_floor():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "VITPRUNE_FAST_TIMM_FLOOR_RUN=1" in ci and "tests/test_timm_floor.py" in ci
