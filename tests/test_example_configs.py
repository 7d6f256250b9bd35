"""Every example config loads, and its parallel layouts fit its models' shapes on an 8-GPU node.

The paper-scale checkpoints are not available here: each model is matched, by the last component of
its checkpoint path, to its public config.json shape in examples/configs/model_shapes/.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_gopd.config import load_config
from megatron_gopd.models import ModelArchitecture
from megatron_gopd.trainer import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
SHAPES = CONFIGS / "model_shapes"
GPUS_PER_NODE = 8
PAPER_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if "tiny" not in p.name)


def _models(cfg: TrainConfig):
    yield "student", cfg.student.checkpoint, cfg.student.tp, cfg.student.pp, cfg.student.ep
    for name, teacher in cfg.scoring.teachers.items():
        yield f"teacher {name}", teacher.model.checkpoint, teacher.model.tp, teacher.model.pp, teacher.model.ep
    for name, ref in cfg.scoring.references.items():
        yield f"reference {name}", ref.checkpoint, ref.tp, ref.pp, ref.ep


def test_there_are_paper_and_tiny_configs():
    names = {p.name for p in CONFIGS.glob("*.yaml")}
    assert len(PAPER_CONFIGS) >= 4 and any("tiny" in n for n in names)


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_paper_config_is_consistent(path):
    cfg = load_config(TrainConfig, path)
    # the paper's hyperparameters
    assert cfg.rollout.temperature == 1.0 and cfg.rollout.n == 1 and cfg.rollout.max_new_tokens == 16384
    assert cfg.prompts_per_step == 1024 and cfg.optim.lr == 1e-5 and cfg.loss.agg == "token-mean"
    assert cfg.loss.tis_cap == 5.0 and cfg.student.recompute
    assert all(t.lam == 1.25 for t in cfg.scoring.teachers.values())
    vocab = set()
    for role, checkpoint, tp, pp, ep in _models(cfg):
        shape = SHAPES / f"{Path(checkpoint).name}.json"
        assert shape.is_file(), f"{path.name}: {role} {checkpoint} has no shape file {shape.name}"
        arch = ModelArchitecture.from_hf_config(json.loads(shape.read_text()), source=str(shape))
        arch.validate_parallel(tp, pp, ep)
        assert GPUS_PER_NODE % (tp * pp) == 0, f"{role}: tp*pp={tp * pp} does not divide {GPUS_PER_NODE}"
        assert (GPUS_PER_NODE // pp) % (ep * tp) == 0 or ep == 1, f"{role}: ep={ep} does not fit"
        vocab.add(arch.vocab_size)
        if role == "student":
            dp = GPUS_PER_NODE // (tp * pp)
            assert cfg.prompts_per_step % dp == 0
    assert len(vocab) == 1, f"{path.name}: models do not share a vocabulary"
    covered = {d for t in cfg.scoring.teachers.values() for d in t.domains}
    assert {s.domain for s in cfg.data.sources} <= covered


def test_tiny_config_loads():
    cfg = load_config(TrainConfig, CONFIGS / "tiny_multi_teacher.yaml")
    assert cfg.scoring.teachers["math"].reference == "math_base"
    assert (cfg.scoring.teachers["math"].model.tp, cfg.scoring.teachers["math"].model.pp) == (2, 2)
