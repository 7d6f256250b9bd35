#!/usr/bin/env python
"""Accuracy of the G-OPD target itself: sample from q ∝ base^(1-lam) * teacher^lam, token by token.

An OPD / ExOPD student is trained towards exactly this distribution (per token, on its own
rollouts), so its accuracy bounds what the students can reach and tells a recipe problem (the
students do not get to q) from a task problem (q is no better than the teacher):

    python examples/toy/sample_target.py --out outputs/demo --lams 1 1.25 1.5 2

Uses the demo's HF exports (``<out>/base/hf``, ``<out>/teacher/hf``) with `transformers` and a KV
cache per model, the prompts of ``<out>/data/<split>.jsonl`` (``--split``; default the validation
split: this is a diagnostic for choosing a recipe, so it stays off the test split) rendered as
training rendered them (no thinking block), temperature 1, and the verifier `gopd-eval` uses (each record's fields
through `megatron_gopd.verifiers`). Prints avg@k per lam.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def load(out: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "base" / "hf")
    models = [
        AutoModelForCausalLM.from_pretrained(out / name / "hf", dtype=torch.float32).eval()
        for name in ("base", "teacher")
    ]
    return tokenizer, models


@torch.no_grad()
def sample_target(
    models, prompt_ids: torch.Tensor, lam: float, max_new_tokens: int, eos_id: int, generator: torch.Generator
) -> torch.Tensor:
    """[n, <= max_new_tokens] tokens sampled from q ∝ base^(1-lam) teacher^lam (eos-padded)."""
    caches = [None, None]
    step_input = prompt_ids
    done = torch.zeros(prompt_ids.shape[0], dtype=torch.bool)
    sampled = []
    for _ in range(max_new_tokens):
        log_probs = []
        for i, model in enumerate(models):
            output = model(step_input, past_key_values=caches[i], use_cache=True)
            caches[i] = output.past_key_values
            log_probs.append(output.logits[:, -1].float().log_softmax(-1))
        base_logp, teacher_logp = log_probs
        target = (lam * teacher_logp + (1.0 - lam) * base_logp).softmax(-1)  # normalised q
        token = torch.multinomial(target, 1, generator=generator).squeeze(1)
        token[done] = eos_id
        sampled.append(token)
        done |= token == eos_id
        if done.all():
            break
        step_input = token[:, None]
    return torch.stack(sampled, dim=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="the demo's output directory")
    parser.add_argument("--lams", type=float, nargs="+", default=[1.0, 1.25, 1.5])
    parser.add_argument("--k", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--split",
        choices=["val", "test"],
        default="val",
        help="prompts to sample (default val: recipe choices are made there)",
    )
    args = parser.parse_args(argv)
    for name in ("base", "teacher"):
        if not (args.out / name / "hf" / "config.json").is_file():
            print(f"{args.out / name / 'hf'} is missing: run the demo first (make demo)", file=sys.stderr)
            return 2
    from megatron_gopd.verifiers import default_registry

    registry = default_registry()
    tokenizer, models = load(args.out)
    rows = [json.loads(line) for line in (args.out / "data" / f"{args.split}.jsonl").read_text().splitlines()]
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r["prompt"]}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=False,
        )
        for r in rows
    ]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if len({len(e) for e in encoded}) != 1:
        print("prompts render to different lengths; this script batches without padding", file=sys.stderr)
        return 2
    prompt_ids = torch.tensor(encoded).repeat_interleave(args.k, dim=0)
    fields = [r for r in rows for _ in range(args.k)]
    print(f"{len(rows)} {args.split} prompts x {args.k} samples, temperature 1", flush=True)
    for lam in args.lams:
        generator = torch.Generator().manual_seed(args.seed)
        tokens = sample_target(models, prompt_ids, lam, args.max_new_tokens, tokenizer.eos_token_id, generator)
        texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
        correct = sum(bool(registry.score(f, text).correct) for f, text in zip(fields, texts))
        print(f"lam={lam:g}: avg@{args.k} {100.0 * correct / len(texts):.1f}%", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
