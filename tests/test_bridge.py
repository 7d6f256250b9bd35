"""HF <-> Megatron conversion for Qwen3 (tied, untied), Qwen3-MoE and Llama 3 across TP/PP/EP layouts.

For each family, on 4 gloo ranks: convert a tiny random `transformers` model at every layout, load
each checkpoint at a *different* layout, compare the logits with `transformers` (fp32, 1e-4), and
stream the weights back out, which must be bit-identical to the original safetensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from megatron_gopd.bridge import CheckpointError
from megatron_gopd.bridge.safetensors_io import iter_tensors
from tests.dist_harness import run_distributed

SMALL = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
DENSE_LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1)]  # (tp, pp, ep)
FAMILIES = {
    "qwen3_tied": (
        Qwen3ForCausalLM,
        lambda: Qwen3Config(**SMALL, head_dim=32, tie_word_embeddings=True),
        DENSE_LAYOUTS,
    ),
    "qwen3_untied": (
        Qwen3ForCausalLM,
        lambda: Qwen3Config(**SMALL, head_dim=32, tie_word_embeddings=False),
        DENSE_LAYOUTS,
    ),
    "qwen3_moe": (
        Qwen3MoeForCausalLM,
        lambda: Qwen3MoeConfig(
            **SMALL, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True
        ),
        DENSE_LAYOUTS + [(1, 1, 2), (2, 1, 2)],
    ),
    "llama3": (
        LlamaForCausalLM,
        lambda: LlamaConfig(
            **{**SMALL, "max_position_embeddings": 16384},
            rope_theta=5e5,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
            ),
        ),
        DENSE_LAYOUTS,
    ),
}


def make_hf_model(tmp_path: Path, family: str, max_shard_size: str = "50KB"):
    """Save a tiny random `transformers` model (sharded safetensors); return (dir, model)."""
    model_cls, config_fn, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = model_cls(config_fn()).eval()
    hf_dir = tmp_path / f"hf_{family}"
    model.save_pretrained(hf_dir, max_shard_size=max_shard_size)
    return hf_dir, model


def _convert_body(
    rank: int, world_size: int, hf_dir: str, work_dir: str, layouts: list, tokens: torch.Tensor, hf_logits: torch.Tensor
) -> dict:
    from megatron.core import parallel_state

    from megatron_gopd import platform
    from megatron_gopd.bridge import export_hf_weights
    from megatron_gopd.bridge.convert import hf_to_mcore, mcore_to_hf
    from megatron_gopd.checkpointing import load_model
    from megatron_gopd.models import ParallelLayout
    from tests.megatron_utils import forward_logits

    original = dict(iter_tensors(hf_dir))
    report = {}
    for i, (tp, pp, ep) in enumerate(layouts):
        saved_as = ParallelLayout(tp=tp, pp=pp, ep=ep)
        ckpt = os.path.join(work_dir, f"ckpt_tp{tp}pp{pp}ep{ep}")
        hf_to_mcore(hf_dir, ckpt, saved_as)
        ltp, lpp, lep = layouts[(i + 1) % len(layouts)]  # load at another layout
        platform.init_model_parallel(tp=ltp, pp=lpp, ep=lep)
        model, arch = load_model(ckpt, ParallelLayout(tp=ltp, pp=lpp, ep=lep))
        model.eval()
        logits, _ = forward_logits(model, tokens, arch.vocab_size)
        exported = dict(export_hf_weights(model, arch))
        key = f"saved tp{tp}pp{pp}ep{ep} -> loaded tp{ltp}pp{lpp}ep{lep}"
        report[key] = dict(
            names_equal=set(exported) == set(original),
            bit_identical=all(torch.equal(exported[n], original[n]) for n in original if n in exported),
            logit_diff=None if not parallel_state.is_pipeline_last_stage() else (logits - hf_logits).abs().max().item(),
        )
    out_dir = os.path.join(work_dir, "exported_hf")
    mcore_to_hf(os.path.join(work_dir, "ckpt_tp2pp1ep1"), out_dir, ParallelLayout(pp=2))
    return report


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_convert_all_layouts_against_transformers(tmp_path, family):
    hf_dir, hf_model = make_hf_model(tmp_path, family)
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hf_logits = hf_model(tokens).logits
    layouts = FAMILIES[family][2]
    reports = run_distributed(
        _convert_body,
        world_size=4,
        hf_dir=str(hf_dir),
        work_dir=str(tmp_path),
        layouts=layouts,
        tokens=tokens,
        hf_logits=hf_logits,
    )
    for rank, report in enumerate(reports):
        assert len(report) == len(layouts)
        for case, numbers in report.items():
            assert numbers["names_equal"] and numbers["bit_identical"], (rank, case)
            if numbers["logit_diff"] is not None:
                assert numbers["logit_diff"] < 1e-4, (rank, case, numbers)
    # the streamed export is a HF checkpoint transformers can load, with the same weights
    exported = tmp_path / "exported_hf"
    reloaded = AutoModelForCausalLM.from_pretrained(exported).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, hf_logits)
    assert json.loads((exported / "config.json").read_text())["architectures"] == [type(hf_model).__name__]


# ----------------------------------------------------------------------------------------------
# Bad input: a clear error, and nothing written


def _expect_error_body(rank: int, world_size: int, hf_dir: str, out: str, tp: int, pp: int, ep: int) -> str:
    from megatron_gopd.bridge.convert import hf_to_mcore
    from megatron_gopd.models import ParallelLayout

    try:
        hf_to_mcore(hf_dir, out, ParallelLayout(tp=tp, pp=pp, ep=ep))
    except (ValueError, FileNotFoundError) as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.tmp")]


@pytest.mark.slow
def test_bad_inputs_fail_cleanly_and_write_nothing(tmp_path):
    hf_dir, _ = make_hf_model(tmp_path, "qwen3_tied")
    moe_dir, _ = make_hf_model(tmp_path, "qwen3_moe", max_shard_size="10GB")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text((moe_dir / "config.json").read_text())
    data = (moe_dir / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    missing_shard = tmp_path / "missing_shard"
    missing_shard.mkdir()
    dropped = sorted(set(json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"].values()))[1]
    for f in hf_dir.iterdir():
        if f.name != dropped and f.is_file():
            (missing_shard / f.name).write_bytes(f.read_bytes())
    unsupported = tmp_path / "unsupported"
    unsupported.mkdir()
    config = json.loads((hf_dir / "config.json").read_text())
    (unsupported / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    not_empty = tmp_path / "not_empty"
    not_empty.mkdir()
    (not_empty / "keep.txt").write_text("precious")

    cases = [
        (unsupported, 1, 1, 1, "GPT2LMHeadModel"),
        (hf_dir, 4, 1, 1, "num_key_value_heads=2 is not divisible by tensor_parallel=4"),
        (moe_dir, 1, 1, 4, "expert_parallel (4) x expert_tensor_parallel (1) does not divide"),  # 2 ranks
        (truncated, 1, 1, 1, "truncated"),
        (missing_shard, 1, 1, 1, dropped),
    ]
    for source, tp, pp, ep, message in cases:
        out = tmp_path / f"out_{source.name}_{tp}{pp}{ep}"
        results = run_distributed(
            _expect_error_body, world_size=2, hf_dir=str(source), out=str(out), tp=tp, pp=pp, ep=ep
        )
        assert all(message in r for r in results), (source.name, results)
        assert _leftovers(tmp_path, out.name) == [], source.name
    results = run_distributed(
        _expect_error_body, world_size=2, hf_dir=str(hf_dir), out=str(not_empty), tp=1, pp=1, ep=1
    )
    assert all("already exists and is not empty" in r for r in results)
    assert [p.name for p in not_empty.iterdir()] == ["keep.txt"]


def _write_path_body(rank: int, world_size: int, hf_dir: str, out: str) -> dict:
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_gopd.bridge.convert import hf_to_mcore
    from megatron_gopd.models import ParallelLayout

    filesystem_async._results_queue = None  # as in a fresh conversion process
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    os.fsync = recording_fsync
    try:
        hf_to_mcore(hf_dir, out, ParallelLayout(tp=world_size))
    finally:
        os.fsync = real_fsync
    return {"helpers": [p.name for p in multiprocessing.active_children()], "synced": synced}


@pytest.mark.slow
def test_conversion_writes_durably_without_a_helper_process(tmp_path):
    """The checkpoint writer runs in the converting ranks (megatron-core's writer would first spawn
    a multiprocessing-manager helper: a fresh interpreter, ~1 s, most of a small conversion's write
    time), and everything renamed into place is on stable storage: every file, every directory and
    the rename itself (the parent directory) are fsync'ed."""
    hf_dir, _ = make_hf_model(tmp_path, "qwen3_tied")
    out = tmp_path / "ckpt"
    results = run_distributed(_write_path_body, world_size=2, hf_dir=str(hf_dir), out=str(out))
    assert [r["helpers"] for r in results] == [[], []]
    synced = {Path(p) for r in results for p in r["synced"]}
    tmp_dirs = {p.parent for p in synced if p.parent.name.startswith(".ckpt.tmp-")}
    assert len(tmp_dirs) == 1, synced  # flushed under the temporary name, before the rename
    (tmp_dir,) = tmp_dirs
    written = {p.relative_to(out) for p in out.rglob("*")} | {Path(".")}
    flushed = {p.relative_to(tmp_dir) for p in synced if p == tmp_dir or tmp_dir in p.parents}
    assert written <= flushed, sorted(map(str, written - flushed))
    assert tmp_path in synced  # the rename


@pytest.mark.slow
def test_experts_not_divisible_by_ep_is_rejected(tmp_path):
    config = Qwen3MoeConfig(**SMALL, head_dim=16, num_experts=3, num_experts_per_tok=2, moe_intermediate_size=32)
    torch.manual_seed(0)
    hf_dir = tmp_path / "moe3"
    Qwen3MoeForCausalLM(config).save_pretrained(hf_dir)
    results = run_distributed(
        _expect_error_body, world_size=2, hf_dir=str(hf_dir), out=str(tmp_path / "o"), tp=1, pp=1, ep=2
    )
    assert all("num_experts=3 is not divisible by expert_parallel=2" in r for r in results)


def test_reader_reports_missing_tensor(tmp_path):
    from megatron_gopd.bridge import SafetensorsReader, check_hf_checkpoint
    from megatron_gopd.models import ModelArchitecture

    hf_dir, _ = make_hf_model(tmp_path, "qwen3_untied", max_shard_size="10GB")
    arch = ModelArchitecture.from_pretrained(hf_dir)
    bad = ModelArchitecture.from_hf_config({**json.loads((hf_dir / "config.json").read_text()), "num_hidden_layers": 5})
    check_hf_checkpoint(arch, SafetensorsReader(hf_dir))
    with pytest.raises(CheckpointError, match="lacks .* model.layers.4"):
        check_hf_checkpoint(bad, SafetensorsReader(hf_dir))


def test_tied_flag_that_disagrees_with_the_tensors_names_the_file_and_field(tmp_path):
    from safetensors.torch import load_file, save_file

    from megatron_gopd.bridge import SafetensorsReader, check_hf_checkpoint
    from megatron_gopd.models import ModelArchitecture

    def with_config(hf_dir: Path, **fields) -> ModelArchitecture:
        config = {**json.loads((hf_dir / "config.json").read_text()), **fields}
        (hf_dir / "config.json").write_text(json.dumps(config))
        return ModelArchitecture.from_pretrained(hf_dir)

    tied, _ = make_hf_model(tmp_path / "a", "qwen3_tied", max_shard_size="10GB")
    check_hf_checkpoint(ModelArchitecture.from_pretrained(tied), SafetensorsReader(tied))
    untied_flag = with_config(tied, tie_word_embeddings=False)  # ... but no lm_head.weight
    with pytest.raises(CheckpointError, match=r"config.json: tie_word_embeddings is false but .* no lm_head.weight"):
        check_hf_checkpoint(untied_flag, SafetensorsReader(tied))

    untied, _ = make_hf_model(tmp_path / "b", "qwen3_untied", max_shard_size="10GB")
    tied_flag = with_config(untied, tie_word_embeddings=True)  # ... but a head of its own
    with pytest.raises(CheckpointError, match=r"config.json: tie_word_embeddings is true but .* lm_head.weight"):
        check_hf_checkpoint(tied_flag, SafetensorsReader(untied))
    # a tied export that also stores the head as a copy of the embedding is fine
    weights = load_file(untied / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, untied / "model.safetensors", metadata={"format": "pt"})
    check_hf_checkpoint(tied_flag, SafetensorsReader(untied))
