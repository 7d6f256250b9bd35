"""ExPO: theta_base + alpha * (theta_teacher - theta_base) over tiny Qwen3 HF checkpoints."""

from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from megatron_gopd.bridge import safetensors_io
from megatron_gopd.evaluation import expo
from megatron_gopd.evaluation.expo import (
    ExpoError,
    expo_merge,
    parse_size,
    plan_shards,
    read_weight_index,
)

REPO = Path(__file__).resolve().parents[1]
TINY = dict(
    vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, intermediate_size=64,
)  # fmt: skip


def save_tiny_qwen3(path: Path, seed: int, dtype: torch.dtype = torch.float32, shard: str = "", **overrides) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**{**TINY, **overrides})).to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    return path


def load_all(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, info in read_weight_index(model_dir).items():
        with safe_open(str(info.file), framework="pt") as f:
            tensors[name] = f.get_tensor(name)
    return tensors


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".expo-tmp-" in p.name]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    base = save_tiny_qwen3(root / "base", seed=0, shard="30KB")  # sharded input, with an index
    teacher = save_tiny_qwen3(root / "teacher", seed=1)  # single model.safetensors
    (teacher / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return {"base": base, "teacher": teacher, "root": root}


def test_inputs_are_one_sharded_and_one_single_file(checkpoints):
    assert (checkpoints["base"] / expo.INDEX_FILE).is_file()
    assert (checkpoints["teacher"] / expo.SINGLE_FILE).is_file()


def test_every_tensor_is_extrapolated(checkpoints, tmp_path):
    out = tmp_path / "expo-1.5"
    summary = expo_merge(checkpoints["base"], checkpoints["teacher"], 1.5, out, max_shard_bytes=40_000)
    base, teacher = load_all(checkpoints["base"]), load_all(checkpoints["teacher"])
    merged = load_all(out)
    assert merged.keys() == teacher.keys() and summary.num_tensors == len(teacher)
    assert len(summary.shard_files) > 1 and (out / expo.INDEX_FILE).is_file()  # sharded output
    for name, tensor in merged.items():
        assert tensor.dtype == torch.float32
        expected = base[name] + 1.5 * (teacher[name] - base[name])
        torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-6, msg=name)
    # The teacher's non-weight files come along; its weights are not copied verbatim.
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"model_max_length": 64}
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()
    assert not (out / expo.SINGLE_FILE).exists()
    assert leftovers(tmp_path) == []


def test_alpha_zero_gives_base_and_one_gives_teacher_exactly(checkpoints, tmp_path):
    base, teacher = load_all(checkpoints["base"]), load_all(checkpoints["teacher"])
    for alpha, reference in ((0.0, base), (1.0, teacher)):
        out = tmp_path / f"alpha-{alpha}"
        expo_merge(checkpoints["base"], checkpoints["teacher"], alpha, out)
        assert (out / expo.SINGLE_FILE).is_file()  # fits one shard: no index, like save_pretrained
        merged = load_all(out)
        assert all(torch.equal(merged[name], reference[name]) for name in reference), alpha


def test_output_loads_with_transformers(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "expo-1.25"
    expo_merge(checkpoints["base"], checkpoints["teacher"], 1.25, out, max_shard_bytes=50_000)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    merged = load_all(out)
    embedding = model.model.embed_tokens.weight.detach()
    torch.testing.assert_close(embedding, merged["model.embed_tokens.weight"])
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, TINY["vocab_size"]) and torch.isfinite(logits).all()


def test_source_dtype_is_kept(tmp_path):
    base = save_tiny_qwen3(tmp_path / "base16", seed=0, dtype=torch.bfloat16)
    teacher = save_tiny_qwen3(tmp_path / "teacher16", seed=1, dtype=torch.bfloat16)
    out = tmp_path / "out16"
    expo_merge(base, teacher, 2.0, out)
    b, t, merged = load_all(base), load_all(teacher), load_all(out)
    for name, tensor in merged.items():
        assert tensor.dtype == torch.bfloat16
        expected = (b[name].float() + 2.0 * (t[name].float() - b[name].float())).to(torch.bfloat16)
        # fp32 arithmetic then a single rounding to bf16: bit-identical to the reference.
        torch.testing.assert_close(tensor, expected, rtol=0, atol=0, msg=name)


# ----------------------------------------------------------------------------------------------
# Refusals: a clear error and no partial output


def test_mismatched_shapes_refused(checkpoints, tmp_path):
    other = save_tiny_qwen3(tmp_path / "wide", seed=2, intermediate_size=48)
    out = tmp_path / "out"
    with pytest.raises(ExpoError, match=r"shape mismatches.*mlp"):
        expo_merge(checkpoints["base"], other, 1.5, out)
    assert not out.exists() and leftovers(tmp_path) == []


def test_mismatched_names_refused(checkpoints, tmp_path):
    other = save_tiny_qwen3(tmp_path / "deep", seed=2, num_hidden_layers=3)
    out = tmp_path / "out"
    with pytest.raises(ExpoError, match=r"only in the teacher.*layers\.2\."):
        expo_merge(checkpoints["base"], other, 1.5, out)
    assert not out.exists() and leftovers(tmp_path) == []


def test_missing_shard_refused(checkpoints, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoints["base"], broken)
    (broken / "model-00002-of-00004.safetensors").unlink()
    out = tmp_path / "out"
    with pytest.raises(ExpoError, match="model-00002-of-00004.safetensors, which is missing"):
        expo_merge(broken, checkpoints["teacher"], 1.5, out)
    with pytest.raises(ExpoError, match="no model.safetensors"):
        expo_merge(checkpoints["base"], tmp_path, 1.5, out)  # tmp_path holds no checkpoint
    with pytest.raises(ExpoError, match="does not exist"):
        expo_merge(tmp_path / "nowhere", checkpoints["teacher"], 1.5, out)
    assert not out.exists() and leftovers(tmp_path) == []


def test_non_empty_output_refused_and_untouched(checkpoints, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ExpoError, match="not an empty directory"):
        expo_merge(checkpoints["base"], checkpoints["teacher"], 1.5, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    empty = tmp_path / "empty"
    empty.mkdir()
    expo_merge(checkpoints["base"], checkpoints["teacher"], 1.5, empty)  # an empty one is fine
    assert (empty / "config.json").is_file()


def test_failure_while_writing_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    calls = []
    real_save = safetensors_io.save_file

    def save_then_fail(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(*args, **kwargs)

    monkeypatch.setattr(safetensors_io, "save_file", save_then_fail)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        expo_merge(checkpoints["base"], checkpoints["teacher"], 1.5, out, max_shard_bytes=40_000)
    assert len(calls) == 2  # one shard had been written before the failure
    assert not out.exists() and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# Helpers and the command line


def test_parse_size_and_shard_plan():
    assert parse_size("30KB") == 30_000 and parse_size("2GB") == 2_000_000_000
    assert parse_size("1GiB") == 1024**3 and parse_size("512") == 512
    with pytest.raises(ValueError):
        parse_size("lots")
    sizes = {"a": 10, "b": 10, "c": 100, "d": 1}  # elements of 4 bytes
    infos = {name: expo.TensorInfo(Path("x"), (n,), "F32") for name, n in sizes.items()}
    assert plan_shards(list(infos), infos, max_shard_bytes=80) == [["a", "b"], ["c"], ["d"]]


def test_cli(checkpoints, tmp_path, capsys):
    main = runpy.run_path(str(REPO / "tools" / "expo.py"))["main"]
    out = tmp_path / "cli-out"
    args = ["--base", str(checkpoints["base"]), "--teacher", str(checkpoints["teacher"])]
    args += ["--alpha", "1.25"]
    assert main([*args, "--out", str(out), "--max-shard-size", "40KB"]) == 0
    weight_map = json.loads((out / expo.INDEX_FILE).read_text())["weight_map"]
    assert 2 <= len(set(weight_map.values())) <= 4  # ~107 KB in shards of at most 40 KB
    assert main([*args, "--out", str(out)]) == 2  # now non-empty
    assert "expo: error: output" in capsys.readouterr().err
