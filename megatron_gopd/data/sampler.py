"""The prompt dataset of a `DataConfig` and the resumable, seeded sampler that draws its batches;
`shard_for_rank` gives each data-parallel rank its slice of a global batch."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, TypeVar

import numpy as np
from transformers import PreTrainedTokenizerBase

from megatron_gopd.data.chat import check_template_kwargs, prompt_to_messages
from megatron_gopd.data.config import DataConfig
from megatron_gopd.data.records import (
    ANSWER_FIELD,
    DOMAIN_FIELD,
    KNOWN_FIELDS,
    PROMPT_FIELD,
    TESTS_FIELD,
    load_records,
)
from megatron_gopd.data.sources import DataStats, PromptSource, mixture_counts, tokenize_source

logger = logging.getLogger(__name__)


@dataclass
class PromptRecord:
    """One prompt of a batch, ready for the rollout engine."""

    index: int
    """Stable id: the same prompt has the same index in every epoch and every run with the same sources."""
    input_ids: list[int]
    """The prompt rendered with the student's chat template, tokenised (ends with the generation prompt)."""
    messages: list[dict[str, str]]
    """The prompt as chat messages, for models that render it with another template."""
    domain: str
    """Routes the prompt to its teacher."""
    source: str
    """Name of the source it came from."""
    answer: Any = None
    """Reference answer for a verifier, if the record has one."""
    tests: Any = None
    """Test cases for a code verifier, if the record has them."""
    extra: dict[str, Any] = field(default_factory=dict)
    """The record's other fields."""
    epoch: int = 0
    """Epoch of the sampler this draw belongs to."""

    def verifier_fields(self) -> dict[str, Any]:
        """What a verifier reads (``domain``, ``answer``, ``tests`` and the other fields), as a
        record of the source file had them."""
        return {DOMAIN_FIELD: self.domain, ANSWER_FIELD: self.answer, TESTS_FIELD: self.tests, **self.extra}


class PromptDataset:
    """All sources of a `DataConfig`, rendered, filtered and tokenised, with their per-epoch counts.

    Build it with `build_prompt_dataset`; draw batches from it with a `PromptSampler`.
    """

    def __init__(self, sources: list[PromptSource], default_domain: str) -> None:
        self.sources = sources
        self.default_domain = default_domain
        counts = mixture_counts(
            [len(src) for src in sources],
            [src.config.share for src in sources],
            [src.config.num_samples for src in sources],
        )
        for src, count in zip(sources, counts):
            src.stats.per_epoch = count
        self.stats = DataStats([src.stats for src in sources])
        if self.stats.epoch_size == 0:
            raise ValueError(f"the prompt mixture is empty after filtering: {self.stats.to_dict()}")

    @property
    def epoch_counts(self) -> list[int]:
        """Prompts per source in each epoch."""
        return [src.stats.per_epoch for src in self.sources]

    def record(self, source: int, kept: int, epoch: int = 0) -> PromptRecord:
        """The `PromptRecord` of the ``kept``-th kept prompt of source number ``source``."""
        src = self.sources[source]
        row = int(src.rows[kept])
        fields = src.records[row]
        return PromptRecord(
            index=src.index_offset + row,
            input_ids=src.prompt_ids(kept),
            messages=prompt_to_messages(fields[PROMPT_FIELD]),
            domain=str(fields.get(DOMAIN_FIELD) or src.config.domain or self.default_domain),
            source=src.config.label,
            answer=fields.get(ANSWER_FIELD),
            tests=fields.get(TESTS_FIELD),
            extra={key: value for key, value in fields.items() if key not in KNOWN_FIELDS},
            epoch=epoch,
        )


def build_prompt_dataset(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> PromptDataset:
    """Load, render, filter and tokenise every source of ``cfg`` with the (student's) ``tokenizer``.

    Raises:
        FileNotFoundError: a source does not exist.
        ValueError: unsupported format, a record without a usable prompt, an unknown template kwarg,
            or a source left empty by filtering while the mixture wants prompts from it.
    """
    cfg.validate()
    template_kwargs = cfg.template_kwargs()
    check_template_kwargs(tokenizer, template_kwargs)
    sources: list[PromptSource] = []
    index_offset = 0
    for src_cfg in cfg.sources:
        records = load_records(src_cfg.path, src_cfg.split, cfg.cache_dir)
        source = tokenize_source(src_cfg, records, tokenizer, template_kwargs, cfg.max_prompt_length, index_offset)
        _check_not_empty(source, cfg.max_prompt_length)
        sources.append(source)
        index_offset += len(records)
    dataset = PromptDataset(sources, cfg.default_domain)
    for stats in dataset.stats.sources:
        logger.info(
            "prompt source %s: %d records, %d kept, %d dropped as longer than max_prompt_length=%s, "
            "%d per epoch, prompt tokens mean %.1f max %d",
            stats.name,
            stats.rows,
            stats.kept,
            stats.dropped_too_long,
            cfg.max_prompt_length,
            stats.per_epoch,
            stats.mean_prompt_tokens,
            stats.max_prompt_tokens,
        )
    return dataset


def _check_not_empty(source: PromptSource, max_prompt_length: Optional[int]) -> None:
    if len(source) > 0 or source.config.excluded:
        return
    stats = source.stats
    if stats.rows == 0:
        raise ValueError(f"prompt source {stats.name!r} ({stats.path}) has no records")
    raise ValueError(
        f"prompt source {stats.name!r} ({stats.path}): all {stats.rows} prompts are longer than "
        f"max_prompt_length={max_prompt_length} tokens"
    )


class PromptSampler:
    """Draws batches of prompts epoch after epoch, deterministically from a seed, with a resumable position.

    Epoch ``e`` is a fixed function of ``(seed, e)``: each source's draw for that epoch (a subset, all
    rows, or repeated passes, per `mixture_counts`) concatenated and, with ``shuffle``, permuted. Batches
    run across epoch boundaries, so every batch is full. The state is just ``(epoch, position)``.
    """

    _STATE_VERSION = 1

    def __init__(self, dataset: PromptDataset, seed: int, shuffle: bool = True) -> None:
        self.dataset = dataset
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._plan = self._epoch_plan(0)

    @property
    def epoch_size(self) -> int:
        """Prompts in one epoch."""
        return self.dataset.stats.epoch_size

    def next_batch(self, num_prompts: int) -> list[PromptRecord]:
        """The next ``num_prompts`` prompts (the global batch: shard it with `shard_for_rank`)."""
        if num_prompts <= 0:
            raise ValueError(f"num_prompts must be > 0, got {num_prompts}")
        batch: list[PromptRecord] = []
        while len(batch) < num_prompts:
            if self.position == self.epoch_size:
                self.epoch += 1
                self.position = 0
                self._plan = self._epoch_plan(self.epoch)
                logger.info("prompt sampler: starting epoch %d", self.epoch)
            take = min(num_prompts - len(batch), self.epoch_size - self.position)
            sources, kept = self._plan
            for i in range(self.position, self.position + take):
                batch.append(self.dataset.record(int(sources[i]), int(kept[i]), self.epoch))
            self.position += take
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The position plus what it depends on (JSON-serialisable)."""
        return {
            "version": self._STATE_VERSION,
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch_counts": list(self.dataset.epoch_counts),
            "source_names": [src.config.label for src in self.dataset.sources],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`; the following batches equal those of the uninterrupted run.

        Raises:
            ValueError: the state was saved with another seed, shuffle setting or data mixture, so the
                following batches could not be the same.
        """
        expected = self.state_dict()
        for key in ("version", "seed", "shuffle", "epoch_counts", "source_names"):
            if state.get(key) != expected[key]:
                raise ValueError(
                    f"cannot resume the prompt sampler: saved {key}={state.get(key)!r} but this run has "
                    f"{expected[key]!r} (same seed, shuffle and prompt data are needed to resume)"
                )
        if not 0 <= state["position"] <= self.epoch_size or state["epoch"] < 0:
            raise ValueError(f"invalid prompt sampler position: epoch {state['epoch']}, position {state['position']}")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._plan = self._epoch_plan(self.epoch)

    def _epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """([epoch_size] source number, [epoch_size] kept-prompt number) of every draw of ``epoch``."""
        sources, kept = [], []
        for number, (src, count) in enumerate(zip(self.dataset.sources, self.dataset.epoch_counts)):
            rng = np.random.default_rng([self.seed, epoch, number])
            kept.append(_draw(len(src), count, rng if self.shuffle else None))
            sources.append(np.full(count, number, dtype=np.int64))
        source_arr, kept_arr = np.concatenate(sources), np.concatenate(kept)
        if self.shuffle:
            # One stream past the per-source ones, for the order of the whole epoch.
            order_rng = np.random.default_rng([self.seed, epoch, len(self.dataset.sources)])
            order = order_rng.permutation(len(kept_arr))
            source_arr, kept_arr = source_arr[order], kept_arr[order]
        return source_arr, kept_arr


def _draw(size: int, count: int, rng: Optional[np.random.Generator]) -> np.ndarray:
    """``count`` indices into ``range(size)``: whole passes, then a subset for the remainder.

    Without ``rng`` the passes and the subset are in order (the first rows), else each is a fresh
    permutation.
    """

    def one_pass() -> np.ndarray:
        return rng.permutation(size) if rng is not None else np.arange(size)

    full, rest = divmod(count, size) if size else (0, 0)
    parts = [one_pass() for _ in range(full)] + [one_pass()[:rest]]
    return np.concatenate(parts).astype(np.int64)


def build_prompt_sampler(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> PromptSampler:
    """`build_prompt_dataset` and a `PromptSampler` over it with the config's seed and shuffling."""
    return PromptSampler(build_prompt_dataset(cfg, tokenizer), seed=cfg.seed, shuffle=cfg.shuffle)


T = TypeVar("T")


def shard_for_rank(batch: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank ``rank``'s contiguous slice of a global batch; the slices of all ranks partition it.

    Raises:
        ValueError: ``rank`` is out of range, or the batch does not divide evenly (every rank must get
            the same number of prompts, or the ranks would run different numbers of micro-batches).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if len(batch) % world_size:
        raise ValueError(
            f"a global batch of {len(batch)} prompts does not divide over {world_size} data-parallel ranks"
        )
    per_rank = len(batch) // world_size
    return list(batch[rank * per_rank : (rank + 1) * per_rank])
