"""Tokenised prompt sources (rendered, length-filtered, stored compactly), their statistics, and
how many prompts each contributes to an epoch of the mixture."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from megatron_gopd.data.chat import encode_texts, render_prompt_text
from megatron_gopd.data.config import DataSourceConfig
from megatron_gopd.data.records import PROMPT_FIELD

# Rows are rendered and tokenised this many at a time (one batched tokenizer call each).
_TOKENIZE_CHUNK = 512


@dataclass
class SourceStats:
    """What happened to one source while loading, and its share of each epoch."""

    name: str
    path: str
    rows: int
    """Records in the file."""
    kept: int
    """Records within the length limit."""
    dropped_too_long: int
    """Records whose rendered prompt exceeds ``max_prompt_length``."""
    max_prompt_tokens: int
    """Longest kept prompt, in tokens (0 when none is kept)."""
    mean_prompt_tokens: float
    """Mean kept prompt length, in tokens (0 when none is kept)."""
    per_epoch: int = 0
    """Prompts this source contributes to each epoch of the mixture."""


@dataclass
class DataStats:
    """Loading statistics of every source; ``to_dict()`` gives flat numbers for metrics."""

    sources: list[SourceStats]

    @property
    def rows(self) -> int:
        """Records in all files."""
        return sum(s.rows for s in self.sources)

    @property
    def kept(self) -> int:
        """Records within the length limit, all sources."""
        return sum(s.kept for s in self.sources)

    @property
    def dropped_too_long(self) -> int:
        """Records dropped as too long, all sources."""
        return sum(s.dropped_too_long for s in self.sources)

    @property
    def epoch_size(self) -> int:
        """Prompts in one epoch of the mixture."""
        return sum(s.per_epoch for s in self.sources)

    def to_dict(self) -> dict[str, float]:
        """Flat ``data/<source>/<stat>`` numbers plus totals, for a metrics line."""
        out: dict[str, float] = {
            "data/rows": self.rows,
            "data/kept": self.kept,
            "data/dropped_too_long": self.dropped_too_long,
            "data/epoch_size": self.epoch_size,
        }
        for s in self.sources:
            for key, value in dataclasses.asdict(s).items():
                if key not in ("name", "path"):
                    out[f"data/{s.name}/{key}"] = value
        return out


@dataclass
class PromptSource:
    """One source after rendering and length filtering; token ids are stored flat (CSR) to stay compact."""

    config: DataSourceConfig
    records: datasets.Dataset
    """The file's records, unfiltered; row numbers index into it."""
    rows: np.ndarray
    """[kept] original row numbers of the kept prompts, ascending."""
    token_ids: np.ndarray
    """[sum of kept lengths] int32 token ids of all kept prompts, concatenated."""
    token_offsets: np.ndarray
    """[kept + 1] start of each kept prompt in ``token_ids``."""
    index_offset: int
    """Added to the original row number to make `PromptRecord.index` unique across sources."""
    stats: SourceStats

    def __len__(self) -> int:
        return len(self.rows)

    def prompt_ids(self, i: int) -> list[int]:
        """Token ids of the i-th kept prompt."""
        return self.token_ids[self.token_offsets[i] : self.token_offsets[i + 1]].tolist()


def tokenize_source(
    config: DataSourceConfig,
    records: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    template_kwargs: dict[str, Any],
    max_prompt_length: Optional[int],
    index_offset: int = 0,
) -> PromptSource:
    """Render and tokenise every record of one source and drop those over ``max_prompt_length``.

    Raises:
        ValueError: a record has no usable prompt (its row number is named).
    """
    kept_rows: list[int] = []
    # One int32 array per kept prompt: Python int lists would cost ~10x the memory on large sets.
    kept_ids: list[np.ndarray] = []
    dropped = 0
    for start in range(0, len(records), _TOKENIZE_CHUNK):
        prompts = records[start : start + _TOKENIZE_CHUNK][PROMPT_FIELD]
        texts = _render_chunk(config.path, start, prompts, tokenizer, template_kwargs)
        for row, ids in enumerate(encode_texts(tokenizer, texts), start=start):
            if max_prompt_length is not None and len(ids) > max_prompt_length:
                dropped += 1
                continue
            kept_rows.append(row)
            kept_ids.append(np.asarray(ids, dtype=np.int32))
    lengths = np.array([len(ids) for ids in kept_ids], dtype=np.int64)
    stats = SourceStats(
        name=config.label,
        path=config.path,
        rows=len(records),
        kept=len(kept_rows),
        dropped_too_long=dropped,
        max_prompt_tokens=int(lengths.max()) if len(lengths) else 0,
        mean_prompt_tokens=float(lengths.mean()) if len(lengths) else 0.0,
    )
    return PromptSource(
        config=config,
        records=records,
        rows=np.array(kept_rows, dtype=np.int64),
        token_ids=np.concatenate(kept_ids) if kept_ids else np.zeros(0, dtype=np.int32),
        token_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        index_offset=index_offset,
        stats=stats,
    )


def _render_chunk(
    path: str,
    first_row: int,
    prompts: list[Any],
    tokenizer: PreTrainedTokenizerBase,
    template_kwargs: dict[str, Any],
) -> list[str]:
    """Rendered prompt texts of consecutive records; a bad record's error names its file and row."""
    texts = []
    for row, prompt in enumerate(prompts, start=first_row):
        try:
            texts.append(render_prompt_text(tokenizer, prompt, template_kwargs))
        except ValueError as err:
            raise ValueError(f"{path}, record {row}: {err}") from err
    return texts


def mixture_counts(
    sizes: Sequence[int], shares: Sequence[Optional[float]], num_samples: Sequence[Optional[int]]
) -> list[int]:
    """Prompts each source contributes to one epoch.

    A source with ``num_samples`` contributes exactly that many. The others contribute all their
    prompts when none of them sets a share; otherwise the largest mixture in proportion to their
    shares in which no source repeats a prompt (shares 1:1 down-sample both to the smaller size, as
    the paper does with math vs code).

    Raises:
        ValueError: shares set on some but not all sources without ``num_samples``.
    """
    counts = [n if n is not None else -1 for n in num_samples]
    weighted = [i for i, n in enumerate(num_samples) if n is None]
    weights = [shares[i] for i in weighted]
    if all(w is None for w in weights):
        for i in weighted:
            counts[i] = sizes[i]
        return counts
    if any(w is None for w in weights):
        raise ValueError("set `share` on every source without num_samples, or on none of them")
    total = sum(weights)
    positive = [i for i in weighted if shares[i] > 0]
    # Epoch length (of the weighted part) at which the first source runs out of unseen prompts.
    epoch = min((sizes[i] * total / shares[i] for i in positive), default=0.0)
    for i in weighted:
        counts[i] = min(sizes[i], int(round(shares[i] / total * epoch))) if shares[i] > 0 else 0
    return counts
