"""Prompt data for on-policy distillation: reading, chat templates, length filtering, mixing, batching.

Only prompts are needed: the student samples the responses. A prompt file (jsonl / json, parquet, or a
directory written by ``datasets.Dataset.save_to_disk``) holds one record per prompt:

    {"prompt": "What is 2 + 3?", "domain": "math", "answer": "5"}
    {"prompt": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}],
     "domain": "code", "tests": [...]}

``prompt`` is a string (rendered as one user message) or a list of chat messages; ``domain`` routes the
prompt to its teacher; ``answer`` / ``tests`` are passed through for verifiers; any other field lands in
``PromptRecord.extra``.

Flow: `build_prompt_sampler(cfg, tokenizer)` loads every source, renders each prompt with the student's
chat template, drops the prompts longer than ``max_prompt_length`` (counted in `DataStats`), then a
`PromptSampler` draws batches from a per-epoch mixture of the sources, shuffled deterministically from
the seed. ``state_dict()`` / ``load_state_dict()`` make the position resumable: a resumed run draws
exactly the batches an uninterrupted one would. Every data-parallel rank builds the same sampler and
keeps its own slice of each global batch with `shard_for_rank`, so no communication is needed.

Teachers may use another chat template than the student: each record keeps its ``messages`` so a
teacher can render them with `render_prompt_ids(teacher_tokenizer, record.messages, ...)`.

Owns:
    records   field names, accepted formats, `load_records`
    chat      chat templates: `prompt_to_messages`, `render_prompt_text` / `render_prompt_ids`,
              `template_variables`, `check_template_kwargs`, `end_of_response_ids`
    config    `DataConfig`, `DataSourceConfig`
    sources   tokenised sources (`PromptSource`, `tokenize_source`), `DataStats`, `mixture_counts`
    sampler   `PromptRecord`, `PromptDataset`, `PromptSampler`, `build_prompt_sampler`, `shard_for_rank`

May import: datasets, numpy, transformers' tokenizer types and jinja2; nothing else from
megatron_gopd (the trainer, the scoring pool and the `gopd-eval` job import it).
"""

from megatron_gopd.data.chat import (
    RESERVED_TEMPLATE_KWARGS,
    check_template_kwargs,
    encode_texts,
    end_of_response_ids,
    prompt_to_messages,
    render_prompt_ids,
    render_prompt_text,
    template_variables,
)
from megatron_gopd.data.config import DataConfig, DataSourceConfig
from megatron_gopd.data.records import (
    ANSWER_FIELD,
    DOMAIN_FIELD,
    JSON_EXTENSIONS,
    PARQUET_EXTENSIONS,
    PROMPT_FIELD,
    TESTS_FIELD,
    load_records,
)
from megatron_gopd.data.sampler import (
    PromptDataset,
    PromptRecord,
    PromptSampler,
    build_prompt_dataset,
    build_prompt_sampler,
    shard_for_rank,
)
from megatron_gopd.data.sources import (
    DataStats,
    PromptSource,
    SourceStats,
    mixture_counts,
    tokenize_source,
)

__all__ = [
    "ANSWER_FIELD",
    "DOMAIN_FIELD",
    "JSON_EXTENSIONS",
    "PARQUET_EXTENSIONS",
    "PROMPT_FIELD",
    "RESERVED_TEMPLATE_KWARGS",
    "TESTS_FIELD",
    "DataConfig",
    "DataSourceConfig",
    "DataStats",
    "PromptDataset",
    "PromptRecord",
    "PromptSampler",
    "PromptSource",
    "SourceStats",
    "build_prompt_dataset",
    "build_prompt_sampler",
    "check_template_kwargs",
    "encode_texts",
    "end_of_response_ids",
    "load_records",
    "mixture_counts",
    "prompt_to_messages",
    "render_prompt_ids",
    "render_prompt_text",
    "shard_for_rank",
    "template_variables",
    "tokenize_source",
]
