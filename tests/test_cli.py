"""The console commands: every one documents itself, and the torchrun re-launch drops --nproc."""

from __future__ import annotations

import pytest

from megatron_gopd import cli


@pytest.mark.parametrize(
    "main, words",
    [
        (cli.convert_main, ["hf-to-mcore", "mcore-to-hf"]),
        (cli.train_main, ["--config", "metrics.jsonl", "resumes"]),
        (cli.eval_main, ["--model", "--data", "avg@k"]),
    ],
)
def test_help(main, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(word in text for word in words), text


@pytest.mark.slow
def test_relaunch_drops_nproc():
    assert cli._without_nproc(["--config", "x.yaml", "--nproc", "4", "optim.lr=1e-5"]) == [
        "--config",
        "x.yaml",
        "optim.lr=1e-5",
    ]
    assert cli._without_nproc(["--nproc=2", "steps=3"]) == ["steps=3"]
