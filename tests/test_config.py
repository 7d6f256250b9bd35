"""YAML + dotted overrides -> typed dataclasses, with errors that name the key and its source."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import pytest

from megatron_gopd.config import ConfigError, load_config, parse_override, to_dict
from megatron_gopd.data import DataConfig


@dataclasses.dataclass
class OptimConfig:
    lr: float = 1e-5
    """Peak learning rate."""
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclasses.dataclass
class TeacherConfig:
    path: str = ""
    lam: float = 1.0
    reference: Optional[str] = None


@dataclasses.dataclass
class JobConfig:
    seed: int = 1234
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    teachers: dict[str, TeacherConfig] = dataclasses.field(default_factory=dict)
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    offload: bool = False


def _write(tmp_path, text: str, name: str = "job.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_and_overrides_fill_nested_dataclasses(tmp_path):
    path = _write(
        tmp_path,
        """
seed: 7
optim: {lr: 3.0e-5, schedule: cosine}
teachers:
  math: {path: /ckpt/math, lam: 1.25, reference: /ckpt/base}
""",
    )
    cfg = load_config(
        JobConfig,
        path,
        [
            "optim.warmup_steps=10",
            "teachers.code.path=/ckpt/code",
            "stop_token_ids=[1, 2]",
            "offload=true",
            "optim.lr=2e-5",
        ],
    )
    assert cfg.seed == 7 and cfg.optim.lr == 2e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.schedule == "cosine" and cfg.optim.warmup_steps == 10
    assert cfg.teachers["math"] == TeacherConfig("/ckpt/math", 1.25, "/ckpt/base")
    assert cfg.teachers["code"] == TeacherConfig("/ckpt/code")
    assert cfg.stop_token_ids == [1, 2] and cfg.offload is True
    assert to_dict(cfg)["teachers"]["math"]["lam"] == 1.25


def test_defaults_work_without_a_file():
    assert load_config(JobConfig) == JobConfig()


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    path = _write(tmp_path, "optim:\n  lrr: 1.0e-5\n")
    with pytest.raises(ConfigError, match=r"'optim.lrr' \(.*job.yaml\): unknown key \(did you mean 'optim.lr'\?\)"):
        load_config(JobConfig, path)


def test_wrong_type_names_key_and_source(tmp_path):
    path = _write(tmp_path, "seed: 7\n")
    with pytest.raises(ConfigError, match=r"'seed' \(.*bad.yaml\): expected an integer, got str 'abc'"):
        load_config(JobConfig, _write(tmp_path, "seed: abc\n", "bad.yaml"))
    with pytest.raises(ConfigError, match=r"'optim.warmup_steps' \(command-line override\): expected an integer"):
        load_config(JobConfig, path, ["optim.warmup_steps=1.5"])
    with pytest.raises(ConfigError, match=r"'offload' .*expected true or false, got int 1"):
        load_config(JobConfig, path, ["offload=1"])
    with pytest.raises(ConfigError, match=r"'optim.schedule' .*one of 'constant', 'cosine'"):
        load_config(JobConfig, path, ["optim.schedule=linear"])
    with pytest.raises(ConfigError, match=r"'stop_token_ids\[1\]' .*expected an integer"):
        load_config(JobConfig, path, ["stop_token_ids=[1, x]"])


def test_post_init_checks_are_reported_with_their_key(tmp_path):
    with pytest.raises(ConfigError, match=r"'optim' \(command-line override\): lr must be > 0"):
        load_config(JobConfig, _write(tmp_path, ""), ["optim.lr=-1"])


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(JobConfig, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(JobConfig, _write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        parse_override("optim.lr")


def test_data_config_loads_through_the_generic_loader(tmp_path):
    path = _write(
        tmp_path,
        """
sources:
  - {path: math.jsonl, domain: math, share: 1.0}
  - {path: code.jsonl, domain: code, share: 1.0}
max_prompt_length: 256
enable_thinking: false
""",
    )
    cfg = load_config(DataConfig, path, ["seed=3"])
    assert [s.domain for s in cfg.sources] == ["math", "code"] and cfg.seed == 3
    assert cfg.max_prompt_length == 256 and cfg.enable_thinking is False
