"""Untrusted files, bad input and process lifetime: each case failed once (issue: hardening)."""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_gopd.checkpointing import CheckpointError, check_checkpoint_files, read_checkpoint_meta
from megatron_gopd.models import ModelArchitecture, UnsupportedModelError
from megatron_gopd.process import OutputDirLock, OutputDirLockedError

REPO = Path(__file__).resolve().parents[1]


class _RunsACommand:
    """What a crafted pickle does: unpickling it calls os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _convert(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megatron_gopd.cli", "gopd-convert", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def test_crafted_checkpoint_metadata_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / ".metadata").write_bytes(pickle.dumps(_RunsACommand(marker)))
    with pytest.raises(CheckpointError, match="refusing to load this checkpoint.*system"):
        check_checkpoint_files(ckpt)
    assert not marker.exists()
    (ckpt / ".metadata").write_bytes(b"\x80\x04\x95")  # truncated
    with pytest.raises(CheckpointError, match="refusing to load"):
        check_checkpoint_files(ckpt)


@pytest.mark.slow
def test_conversion_of_a_crafted_or_truncated_checkpoint_fails_cleanly(tiny_assets, tmp_path):
    marker = tmp_path / "ran"
    crafted = tmp_path / "crafted"
    shutil.copytree(tiny_assets / "ckpt" / "student", crafted)
    (crafted / ".metadata").write_bytes(pickle.dumps(_RunsACommand(marker)))
    result = _convert("mcore-to-hf", "--ckpt", str(crafted), "--out", str(tmp_path / "out1"))
    assert result.returncode == 2 and "refusing to load this checkpoint" in result.stderr, result.stderr[-2000:]
    assert not marker.exists() and not (tmp_path / "out1").exists()

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_assets / "ckpt" / "student", truncated)
    for shard in truncated.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    result = _convert("mcore-to-hf", "--ckpt", str(truncated), "--out", str(tmp_path / "out2"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "truncated or corrupt" in result.stderr and str(truncated) in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "out2").exists()


def _torch_saved(obj) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _with_crafted_shard_item(genuine: Path, crafted: Path, payload: bytes) -> str:
    """Copy the checkpoint `genuine` to `crafted`, append `payload` to a shard file and point one of
    its byte items (a linear layer's `_extra_state`, which torch's loader unpickles rather than reads
    as a tensor) at it; the `.metadata` stays genuine (the same classes, only that item's offset and
    length differ), so it passes the metadata guard. Returns the item's name."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    shutil.copytree(genuine, crafted)
    metadata = FileSystemReader(str(crafted)).read_metadata()
    name = next(k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
    index = next(i for i in metadata.storage_data if i.fqn == name)
    info = metadata.storage_data[index]
    shard = crafted / info.relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(payload)
    metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(payload))
    metadata.storage_meta = None  # as written: the loader fills in its own load id
    (crafted / ".metadata").write_bytes(pickle.dumps(metadata))
    return name


# torch.load's default (weights_only=True since torch 2.6) can be flipped by the environment: the
# loaders must not depend on it.
_UNSAFE_DEFAULT = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}


@pytest.mark.slow
def test_conversion_of_a_checkpoint_with_a_crafted_shard_item_or_common_file_fails_cleanly(tiny_assets, tmp_path):
    """A genuine `.metadata` with one shard byte item (or `common.pt`) replaced by a pickle that runs
    a command: megatron-core's planner unpickled such items with `torch.load(weights_only=False)`."""
    genuine = tiny_assets / "ckpt" / "student"
    marker = tmp_path / "ran"
    crafted = tmp_path / "crafted_shard"
    item = _with_crafted_shard_item(genuine, crafted, _torch_saved([_RunsACommand(marker)]))
    check_checkpoint_files(crafted)  # the metadata is genuine
    result = _convert("mcore-to-hf", "--ckpt", str(crafted), "--out", str(tmp_path / "out1"), env=_UNSAFE_DEFAULT)
    assert not marker.exists(), "the crafted shard item ran its command"
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"{crafted}: refusing to load this checkpoint" in result.stderr, result.stderr[-3000:]
    assert item in result.stderr and "posix.system" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "out1").exists()

    crafted = tmp_path / "crafted_common"
    shutil.copytree(genuine, crafted)
    (crafted / "common.pt").write_bytes(_torch_saved({"x": _RunsACommand(marker)}))
    result = _convert("mcore-to-hf", "--ckpt", str(crafted), "--out", str(tmp_path / "out2"), env=_UNSAFE_DEFAULT)
    assert not marker.exists(), "the crafted common.pt ran its command"
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"{crafted / 'common.pt'}: refusing to load this checkpoint" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "out2").exists()


def _load_body(rank: int, world_size: int, ckpt: str, skip_metadata_check: bool) -> str:
    """Load `ckpt` with `load_model`, the loader of every command; with `skip_metadata_check`, as if
    ``.metadata`` changed after `check_checkpoint_files` read it (the load must read it restricted too)."""
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch

    from megatron_gopd import checkpointing, platform
    from megatron_gopd.models import ParallelLayout

    originals = (mcore_torch.MCoreLoadPlanner, mcore_torch._get_filesystem_reader)
    check = checkpointing.check_checkpoint_files
    if skip_metadata_check:
        checkpointing.check_checkpoint_files = lambda ckpt_dir: None
    try:
        platform.init_model_parallel(tp=1, pp=1, ep=1)
        checkpointing.load_model(ckpt, ParallelLayout())
        outcome = "loaded"
    except checkpointing.CheckpointError as err:
        outcome = f"CheckpointError: {err}"
    finally:
        checkpointing.check_checkpoint_files = check
    # megatron-core's own planner and reader are back once the load is over
    assert (mcore_torch.MCoreLoadPlanner, mcore_torch._get_filesystem_reader) == originals
    return outcome


@pytest.mark.slow
def test_crafted_shard_items_and_metadata_are_refused_on_every_rank(tiny_assets, tmp_path):
    from tests.dist_harness import run_distributed

    genuine = tiny_assets / "ckpt" / "student"
    marker = tmp_path / "ran"
    crafted = tmp_path / "crafted_shard"
    item = _with_crafted_shard_item(genuine, crafted, _torch_saved([_RunsACommand(marker)]))
    swapped = tmp_path / "swapped_metadata"
    shutil.copytree(genuine, swapped)
    (swapped / ".metadata").write_bytes(pickle.dumps(_RunsACommand(marker)))

    results = run_distributed(_load_body, world_size=2, ckpt=str(genuine), skip_metadata_check=False)
    assert results == ["loaded", "loaded"]
    results = run_distributed(_load_body, world_size=2, ckpt=str(crafted), skip_metadata_check=False)
    assert not marker.exists()
    for result in results:
        assert result.startswith(f"CheckpointError: {crafted}: refusing to load this checkpoint (shard item"), result
        assert item in result and "posix.system" in result, result
    results = run_distributed(_load_body, world_size=2, ckpt=str(swapped), skip_metadata_check=True)
    assert not marker.exists()
    for result in results:
        assert result.startswith(f"CheckpointError: {swapped}: cannot read"), result
        assert ".metadata: UnpicklingError: refers to posix.system" in result, result


def test_a_megatron_core_loader_that_cannot_be_restricted_is_refused(monkeypatch, tmp_path):
    """If megatron-core's torch_dist `load` stops building its planner and reader from the names that
    `load_distributed` swaps for restricted ones, loading fails before reading a file."""
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch

    from megatron_gopd.checkpointing import _restricted_load_strategy_classes

    def load(self, sharded_state_dict, checkpoint_dir):  # builds its planner some other way
        raise AssertionError("ran unrestricted")

    monkeypatch.setattr(mcore_torch.TorchDistLoadShardedStrategy, "load", load)
    strategy = _restricted_load_strategy_classes()[0]()
    with pytest.raises(CheckpointError, match="refusing to load: .* cannot be restricted"):
        strategy.load({}, tmp_path)


def _unrestricted_loads(source: str, filename: str) -> list[str]:
    """Each place in `source` that unpickles without restriction: a `torch.load` without
    ``weights_only=True``, any other ``weights_only`` than True, a pickle / dill / cloudpickle /
    joblib / marshal load or Unpickler, `shelve.open`, `numpy.load(allow_pickle=...)`; the one
    exception is the allow-list unpickler of checkpoint metadata (`checkpointing._MetadataUnpickler`)."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}  # local name -> what it names ("pickle", "torch.load", ...)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"

    def qualified(expr: ast.expr) -> str:
        if isinstance(expr, ast.Name):
            return aliases.get(expr.id, expr.id)
        if isinstance(expr, ast.Attribute):
            return f"{qualified(expr.value)}.{expr.attr}"
        return ""

    pickle_modules = ("pickle", "_pickle", "cPickle", "dill", "cloudpickle")
    unrestricted = {f"{m}.{f}" for m in pickle_modules for f in ("load", "loads", "Unpickler")}
    unrestricted |= {"joblib.load", "marshal.load", "marshal.loads", "shelve.open", "torch.serialization.load"}
    allowed_bases = {("megatron_gopd/checkpointing.py", "_MetadataUnpickler"): "pickle.Unpickler"}
    allowed = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and (filename, node.name) in allowed_bases:
            allowed |= {id(b) for b in node.bases if qualified(b) == allowed_bases[(filename, node.name)]}

    found = []
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.keyword) and node.arg == "weights_only":
            if not (isinstance(node.value, ast.Constant) and node.value.value is True):
                found.append(f"{where}: weights_only={ast.unparse(node.value)}")
        elif isinstance(node, ast.Call) and qualified(node.func) in ("torch.load", "numpy.load"):
            keywords = {k.arg: k.value for k in node.keywords}
            if qualified(node.func) == "numpy.load" and "allow_pickle" in keywords:
                found.append(f"{where}: numpy.load(allow_pickle=...)")
            elif qualified(node.func) == "torch.load" and not (
                isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value is True
            ):
                found.append(f"{where}: torch.load without weights_only=True")
        elif isinstance(node, (ast.Attribute, ast.Name)) and isinstance(node.ctx, ast.Load):
            if qualified(node) in unrestricted and id(node) not in allowed:
                found.append(f"{where}: {qualified(node)}")
    return sorted(found, key=lambda f: int(f.split(":")[1]))


def test_no_unrestricted_unpickling_in_the_source_tree():
    bad = """
import pickle, torch, dill
import pickle as pk
from pickle import loads
from torch import load
import numpy as np
torch.load(f)
torch.load(f, weights_only=False)
load(f, map_location="cpu")
torch.load(f, **kwargs)
pickle.load(f)
pk.loads(b)
loads(b)
dill.load(f)
np.load(f, allow_pickle=True)
class U(pickle.Unpickler): pass
class _MetadataUnpickler(pickle.Unpickler): pass
torch.load(f, weights_only=True)
"""
    found = _unrestricted_loads(bad, "megatron_gopd/elsewhere.py")
    lines = [int(f.split(":")[1]) for f in found]
    assert lines == [7, 8, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], found  # line 8: the call and its keyword
    # the metadata unpickler is the one exception, and only where it is
    assert _unrestricted_loads(bad, "megatron_gopd/checkpointing.py") == [
        f.replace("elsewhere", "checkpointing") for f in found if ":17:" not in f
    ]

    sources = [
        p for d in ("megatron_gopd", "tools", "examples", "benchmarks") for p in sorted((REPO / d).rglob("*.py"))
    ]
    assert len(sources) > 50
    found = [f for p in sources for f in _unrestricted_loads(p.read_text(), str(p.relative_to(REPO)))]
    assert found == [], "unpickling without an allow-list:\n" + "\n".join(found)


@pytest.mark.slow
def test_conversion_layout_is_checked_before_any_rank_starts(tiny_assets, tmp_path):
    result = _convert(
        "hf-to-mcore", "--hf-dir", str(tiny_assets / "hf" / "student"), "--out", str(tmp_path / "out"), "--tp", "3"
    )
    assert result.returncode == 2 and "num_attention_heads=4 is not divisible by tensor_parallel=3" in result.stderr
    assert "starting 3 local ranks" not in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_verify_conversion_checks_the_layout_before_any_rank_starts(tiny_assets):
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "verify_conversion.py"), "--tp", "3"]
        + ["--hf-dir", str(tiny_assets / "hf" / "student"), "--ckpt", str(tiny_assets / "ckpt" / "student")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "num_attention_heads=4 is not divisible by tensor_parallel=3" in result.stderr
    assert "valid tensor_parallel sizes for this model: 1, 2" in result.stderr
    assert "Traceback" not in result.stderr and "starting 3 local ranks" not in result.stderr


def test_malformed_json_names_the_file(tmp_path):
    (tmp_path / "gopd_checkpoint.json").write_text('{"format_version": 1,')
    with pytest.raises(ValueError, match=r"gopd_checkpoint.json: not valid JSON \(line 1"):
        read_checkpoint_meta(tmp_path)
    (tmp_path / "config.json").write_text("\xff\xfe garbage")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        ModelArchitecture.from_pretrained(tmp_path)


def test_zero_sized_model_fields_are_errors_not_crashes():
    config = json.loads((REPO / "examples" / "configs" / "model_shapes" / "Qwen3-1.7B.json").read_text())
    with pytest.raises(UnsupportedModelError, match="num_attention_heads=0 must be a positive integer"):
        ModelArchitecture.from_hf_config({**config, "num_attention_heads": 0})
    with pytest.raises(UnsupportedModelError, match="num_hidden_layers=-2 must be a positive integer"):
        ModelArchitecture.from_hf_config({**config, "num_hidden_layers": -2})


@pytest.mark.slow
def test_one_job_per_output_dir_and_stale_locks_recover(tmp_path):
    first = OutputDirLock(tmp_path).acquire()
    with pytest.raises(OutputDirLockedError, match=f"pid {os.getpid()}"):
        OutputDirLock(tmp_path).acquire()
    first.release()
    OutputDirLock(tmp_path).acquire().release()
    # A holder killed with SIGKILL leaves the lock file, but not the lock.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from megatron_gopd.process import "
            "OutputDirLock; OutputDirLock(sys.argv[1]).acquire(); print('held', flush=True); "
            "time.sleep(60)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(OutputDirLockedError, match=f"pid {holder.pid}"):
        OutputDirLock(tmp_path).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            OutputDirLock(tmp_path).acquire().release()
            break
        except OutputDirLockedError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_local_ranks_get_their_share_of_the_cores(caplog):
    """`--nproc N` ranks each run cores / N intra-op threads (two ranks at torch's default on 2 cores
    ran 3.2x slower), unless OMP_NUM_THREADS says otherwise; the start-up log line names the count."""
    import logging

    from megatron_gopd.process import launch_local_ranks, threads_per_rank

    cores = len(os.sched_getaffinity(0))
    assert threads_per_rank(2, {}) == (max(1, cores // 2), f"{cores} cores / 2 ranks; set OMP_NUM_THREADS to override")
    assert threads_per_rank(64, {})[0] == 1
    assert threads_per_rank(2, {"OMP_NUM_THREADS": "3"}) == (3, "OMP_NUM_THREADS")
    with pytest.raises(ValueError, match="OMP_NUM_THREADS='many'"):
        threads_per_rank(2, {"OMP_NUM_THREADS": "many"})
    check = "import sys, torch; sys.exit(0 if torch.get_num_threads() == int(sys.argv[1]) else 1)"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    with caplog.at_level(logging.INFO, logger="megatron_gopd.process"):
        assert launch_local_ranks(2, ["-c", check, str(max(1, cores // 2))], env=env, master_port=0) == 0
    assert f"starting 2 local ranks, {max(1, cores // 2)} thread" in caplog.text
    assert launch_local_ranks(2, ["-c", check, "1"], env={**env, "OMP_NUM_THREADS": "1"}, master_port=0) == 0
