"""Shared fixtures: the upstream golden data in ../shared/golden and checkpoints made per run."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# Session fixtures shared across modules: the tiny checkpoint and its ONNX export, and the real
# tritonserver deployments (tiny and golden) with their in-process twins; and how the suite is
# split over two xdist workers.
pytest_plugins = ["fixtures_onnx", "fixtures_serving", "parallel_plan"]

GOLDEN = Path(os.environ.get("ACESTEP_GOLDEN_DIR", ROOT.parent / "shared" / "golden"))


@pytest.fixture(autouse=True)
def _seeded_global_rngs() -> None:
    """Every test starts from the same global RNG state, so inputs drawn without an explicit
    generator are the same on every run (a tolerance is never met by luck on one run only)."""
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """The upstream reference numbers (read from ../shared, never copied into the project)."""
    if not (GOLDEN / "manifest.json").exists():
        pytest.fail(f"golden fixtures not found at {GOLDEN} (set ACESTEP_GOLDEN_DIR)")
    return GOLDEN


@pytest.fixture(scope="session")
def golden_components(golden_dir: Path) -> dict[str, np.ndarray]:
    with np.load(golden_dir / "components.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def golden_cases(golden_dir: Path) -> dict[str, dict]:
    data = json.loads((golden_dir / "cases" / "cases.json").read_text())
    return {c["name"]: c for c in data["cases"]}


@pytest.fixture(scope="session")
def golden_ckpt(golden_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The golden checkpoint in the official four-folder layout, materialised once per run."""
    out = tmp_path_factory.mktemp("golden_ckpt")
    subprocess.run([sys.executable, str(golden_dir / "materialize.py"), str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    return out
