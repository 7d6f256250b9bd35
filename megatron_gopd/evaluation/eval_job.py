"""The `gopd-eval` job: load a model (HF directory or Megatron checkpoint), sample, verify, report."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch.distributed as dist

logger = logging.getLogger(__name__)


def load_model_for_eval(path: str, layout):
    """(model, arch, tokenizer dir) from a HF directory or a converted / trained Megatron checkpoint."""
    from megatron_gopd.bridge import load_hf_weights
    from megatron_gopd.checkpointing import HF_SUBDIR, META_FILE, load_model
    from megatron_gopd.models import ModelArchitecture, build_gpt_model

    if (Path(path) / META_FILE).is_file():
        model, arch = load_model(path, layout, dtype="float32")
        return model, arch, Path(path) / HF_SUBDIR
    arch = ModelArchitecture.from_pretrained(path)
    arch.validate_parallel(layout.tp, layout.pp, layout.ep)
    model = build_gpt_model(arch, layout, dtype="float32", perform_initialization=False)
    load_hf_weights(model, arch, path)
    return model, arch, Path(path)


def model_config_dir(path: str) -> Path:
    """The directory holding the ``config.json`` of a HF directory or a Megatron checkpoint."""
    from megatron_gopd.checkpointing import HF_SUBDIR, META_FILE

    return Path(path) / HF_SUBDIR if (Path(path) / META_FILE).is_file() else Path(path)


def all_records(dataset) -> list:
    """Every kept prompt of a `data.PromptDataset`, in file order."""
    return [dataset.record(i, k) for i, source in enumerate(dataset.sources) for k in range(len(source))]


def run_eval(args: Any) -> dict:
    """Run one evaluation described by `gopd-eval`'s parsed arguments; rank 0 prints and writes."""
    from megatron.core import parallel_state
    from transformers import AutoTokenizer

    from megatron_gopd import platform
    from megatron_gopd.data import DataConfig, DataSourceConfig, build_prompt_dataset, end_of_response_ids
    from megatron_gopd.evaluation.avg_at_k import evaluate
    from megatron_gopd.models import ParallelLayout
    from megatron_gopd.rollout import SamplingParams, VLLMRolloutEngine, build_rollout_engine

    layout = ParallelLayout(tp=args.tp, pp=args.pp)
    platform.init_model_parallel(tp=args.tp, pp=args.pp, seed=args.seed)
    model, arch, tokenizer_dir = load_model_for_eval(args.model, layout)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    enable_thinking = None if args.enable_thinking is None else args.enable_thinking == "true"
    data = DataConfig(
        sources=[DataSourceConfig(path=args.data)],
        max_prompt_length=args.max_prompt_length,
        enable_thinking=enable_thinking,
        shuffle=False,
    )
    records = all_records(build_prompt_dataset(data, tokenizer))[: args.max_prompts]
    eos = end_of_response_ids(tokenizer, tokenizer_dir)
    # The longest sample of this evaluation, so engines size their caches (vLLM its max_model_len)
    # for it rather than for the model's whole context.
    longest = min(
        max((len(r.input_ids) for r in records), default=1) + args.max_new_tokens, arch.max_position_embeddings
    )
    if args.engine == "vllm":
        engine = VLLMRolloutEngine(
            model,
            arch,
            tokenizer_dir,
            eos_token_ids=eos,
            max_sequence_length=longest,
            max_batch_size=args.max_batch_size,
            kv_cache_gb=args.kv_cache_gb,
            seed=args.seed,
        )
        engine.sync_weights()
    else:
        engine = build_rollout_engine(
            args.engine,
            model,
            arch,
            eos_token_ids=eos,
            layout=layout,
            max_sequence_length=longest,
            kv_cache_gb=args.kv_cache_gb,
            max_batch_size=args.max_batch_size,
        )
    dp_rank = parallel_state.get_data_parallel_rank()
    sampling = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        n=args.k,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed * 1009 + dp_rank,
    )
    scoring_rank = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    writer = dist.get_rank() == 0  # asked now: closing the vLLM engine ends torch.distributed
    try:
        report, verdicts = evaluate(
            engine,
            tokenizer,
            records,
            sampling,
            dp_rank=dp_rank,
            dp_size=parallel_state.get_data_parallel_world_size(),
            scoring_rank=scoring_rank,
            keep_samples=bool(args.samples_out),
        )
    finally:
        engine.close()
    result = {
        "model": str(args.model),
        "data": str(args.data),
        "temperature": args.temperature,
        "top_p": args.top_p,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        **report.to_dict(),
    }
    if writer:
        print(report.table(), flush=True)
        if args.out:
            tmp = f"{args.out}.tmp"
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(tmp).write_text(json.dumps(result, indent=2))
            os.replace(tmp, args.out)
        if args.samples_out:
            write_samples(args.samples_out, records, verdicts)
    return result


def write_samples(path: str, records: list, verdicts: list) -> None:
    """Every sample as one JSON line: the prompt record's fields plus ``prompt_index``, ``response``,
    ``correct``, ``truncated`` and ``response_tokens``, in prompt order. The file is itself a prompt
    file whose ``response`` field `gopd-train mode=sft` trains on (the paper's SFT-on-teacher-samples
    baseline).
    """
    by_index = {record.index: record for record in records}
    tmp = f"{path}.tmp"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w") as f:
        for verdict in sorted(verdicts, key=lambda v: v.prompt_index):
            record = by_index[verdict.prompt_index]
            row = {
                "prompt_index": record.index,
                "prompt": record.messages,
                **record.verifier_fields(),
                "response": verdict.response,
                "correct": verdict.correct,
                "truncated": verdict.truncated,
                "response_tokens": verdict.response_tokens,
            }
            f.write(json.dumps({k: v for k, v in row.items() if v is not None}) + "\n")
    os.replace(tmp, path)
