"""Tiny models, checkpoints and prompt data for tests, the tiny example configs and launch scripts.

`build_tiny_assets(out_dir)` writes, without any network access::

    <out>/hf/{student,math_teacher,code_teacher,math_base}/   tiny random Qwen3 models + tokenizer
    <out>/ckpt/{student,math_teacher,code_teacher,math_base}/ the same, converted (gopd-convert)
    <out>/data/{math,code}.jsonl                                prompts with answers
    <out>/data/math_sft.jsonl                                   the same math prompts with responses

The examples/configs/*tiny*.yaml files point at ``outputs/tiny_assets`` (the default `out_dir`).
Conversion needs torch.distributed: call this after `platform.init_distributed()` (a world of one
is enough; the checkpoints load at any layout).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from megatron_gopd.testing.tiny_tokenizer import TINY_VOCAB_SIZE, build_tiny_tokenizer

DEFAULT_DIR = "outputs/tiny_assets"
MODELS = ("student", "math_teacher", "code_teacher", "math_base")


def tiny_qwen3_config(**overrides):
    """A 4-layer Qwen3 small enough for 4 CPU ranks, shaped to split at TP=2 and PP=2.

    Untied: with tied embeddings every random model mostly predicts "repeat the current token", so
    teachers and student would agree and distillation would have nothing to learn.
    """
    from transformers import Qwen3Config

    fields = dict(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    )
    fields.update(overrides)
    return Qwen3Config(**fields)


def _write_prompts(data_dir: Path, seed: int = 0, count: int = 64) -> None:
    rng = random.Random(seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "math.jsonl", "w") as f, open(data_dir / "math_sft.jsonl", "w") as sft:
        for _ in range(count):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            record = {"prompt": f"{a}+{b}=", "domain": "math", "answer": str(a + b)}
            f.write(json.dumps(record) + "\n")
            sft.write(json.dumps({**record, "response": f"\\boxed{{{a + b}}}"}) + "\n")
    with open(data_dir / "code.jsonl", "w") as f:
        for _ in range(count):
            n = rng.randint(1, 9)
            f.write(
                json.dumps(
                    {"prompt": f"print {n} squared", "domain": "code", "tests": [{"input": "", "output": str(n * n)}]}
                )
                + "\n"
            )


def build_tiny_assets(out_dir: str | Path = DEFAULT_DIR, seed: int = 0) -> Path:
    """Create (or complete) the tiny asset tree under `out_dir`; existing parts are kept."""
    from transformers import Qwen3ForCausalLM

    from megatron_gopd.bridge.convert import hf_to_mcore
    from megatron_gopd.models import ParallelLayout

    out = Path(out_dir)
    for i, name in enumerate(MODELS):
        hf_dir = out / "hf" / name
        if not (hf_dir / "config.json").is_file():
            torch.manual_seed(seed + i)
            model = Qwen3ForCausalLM(tiny_qwen3_config())
            with torch.no_grad():
                # A plain random init is close to uniform; a sharper (but untied, so each model has
                # its own preferences) output layer gives distinct teachers and clear KLs.
                model.lm_head.weight.mul_(6.0)
            model.save_pretrained(hf_dir)
            build_tiny_tokenizer(save_dir=str(hf_dir))
        ckpt = out / "ckpt" / name
        if not (ckpt / "gopd_checkpoint.json").is_file():
            hf_to_mcore(hf_dir, ckpt, ParallelLayout())
    if not (out / "data" / "math_sft.jsonl").is_file():
        _write_prompts(out / "data", seed)
    return out
