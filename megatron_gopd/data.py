"""Prompt datasets for on-policy distillation: loading, chat templates, length filtering, mixing, batching.

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

Teachers may use another chat template (pitfalls.md): each record keeps its ``messages`` so a teacher
can render them with `render_prompt_ids(teacher_tokenizer, record.messages, ...)`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, TypeVar

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

PROMPT_FIELD = "prompt"
DOMAIN_FIELD = "domain"
ANSWER_FIELD = "answer"
TESTS_FIELD = "tests"
_KNOWN_FIELDS = (PROMPT_FIELD, DOMAIN_FIELD, ANSWER_FIELD, TESTS_FIELD)

JSON_EXTENSIONS = (".jsonl", ".json")
PARQUET_EXTENSIONS = (".parquet",)

# Template variables that the data pipeline sets itself (or that transformers owns); a user may not
# pass them through ``chat_template_kwargs``.
_RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "messages",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "return_dict",
        "tools",
        "documents",
        "enable_thinking",  # has its own DataConfig field
    }
)
# Rows are rendered and tokenised this many at a time (one batched tokenizer call each).
_TOKENIZE_CHUNK = 512


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class DataSourceConfig:
    """One prompt file and its share of every epoch."""

    path: str = ""
    """A ``.jsonl`` / ``.json`` file, a ``.parquet`` file, or a directory written by ``save_to_disk``."""

    name: Optional[str] = None
    """Name used in logs, stats and ``PromptRecord.source``; defaults to the file name without extension."""

    domain: Optional[str] = None
    """Domain of this source's records that carry no ``domain`` field (else ``DataConfig.default_domain``)."""

    share: Optional[float] = None
    """Relative weight of this source in each epoch (need not sum to 1). When the sources without
    ``num_samples`` all set a share, the epoch is the largest mixture in those proportions that repeats
    no prompt: equal shares down-sample every source to the smallest one's size. Unset on all of them:
    each contributes all its prompts. 0 excludes the source."""

    num_samples: Optional[int] = None
    """Exact number of prompts this source contributes per epoch (takes precedence over ``share``): fewer
    than its size down-samples (a fresh random subset each epoch), more up-samples (whole passes plus a
    random remainder)."""

    split: str = "train"
    """Split to use when ``path`` is a saved ``DatasetDict`` directory."""

    def __post_init__(self) -> None:
        # Only value checks: the default instance must construct (a config loader may build it
        # first and fill the path later); `DataConfig.validate()` checks the path.
        if self.share is not None and (not math.isfinite(self.share) or self.share < 0):
            raise ValueError(
                f"data source {self.label!r}: share must be a finite number >= 0, got {self.share}"
            )
        if self.num_samples is not None and self.num_samples < 0:
            raise ValueError(f"data source {self.label!r}: num_samples must be >= 0, got {self.num_samples}")

    @property
    def label(self) -> str:
        """``name``, or the file name without extension when ``name`` is unset."""
        return self.name or _default_source_name(self.path)

    @property
    def excluded(self) -> bool:
        """True when the mixture takes nothing from this source (share 0 or num_samples 0)."""
        if self.num_samples is not None:
            return self.num_samples == 0
        return self.share == 0


@dataclass
class DataConfig:
    """Prompt data: sources and their mixture, chat-template rendering, length limit, shuffling."""

    sources: list[DataSourceConfig] = field(default_factory=list)
    """Prompt files, mixed per epoch according to each one's ``share`` / ``num_samples``."""

    max_prompt_length: Optional[int] = None
    """Prompts longer than this many tokens (after the chat template) are dropped and counted;
    None: no limit."""

    default_domain: str = "default"
    """Domain of records that carry none and whose source sets none."""

    enable_thinking: Optional[bool] = None
    """Passed to the chat template as ``enable_thinking`` (Qwen3: False adds an empty think block to the
    generation prompt); None: not passed, the template's default applies."""

    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Other variables for the chat template; each must be one the template reads (checked at load)."""

    seed: int = 1234
    """Seed of the per-epoch sampling and shuffling."""

    shuffle: bool = True
    """Shuffle each epoch; False keeps source order and file order (down-sampling then takes the
    first rows)."""

    cache_dir: Optional[str] = None
    """Cache directory for ``datasets`` when reading jsonl / parquet; None: the ``datasets`` default."""

    def __post_init__(self) -> None:
        # A generic YAML loader may hand the sources over as plain dicts.
        self.sources = [
            DataSourceConfig(**src) if isinstance(src, dict) else src for src in self.sources
        ]
        self._check_values()

    def _check_values(self) -> None:
        """Checks that hold for the default instance too: ranges, mixture consistency, names, kwargs."""
        if self.max_prompt_length is not None and self.max_prompt_length <= 0:
            raise ValueError(f"max_prompt_length must be > 0 or None, got {self.max_prompt_length}")
        names = [src.label for src in self.sources]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"data sources share the names {duplicates}: set a distinct `name` on each")
        weighted = [src for src in self.sources if src.num_samples is None]
        with_share = [src.label for src in weighted if src.share is not None]
        if with_share and len(with_share) != len(weighted):
            missing = [src.label for src in weighted if src.share is None]
            raise ValueError(
                f"sources {with_share} set `share` but {missing} set neither `share` nor `num_samples`: "
                "set a share on every source without num_samples, or on none of them"
            )
        reserved = sorted(_RESERVED_TEMPLATE_KWARGS & set(self.chat_template_kwargs))
        if reserved:
            raise ValueError(
                f"chat_template_kwargs may not set {reserved}: the data pipeline sets them "
                "(use DataConfig.enable_thinking for enable_thinking)"
            )

    def validate(self) -> None:
        """All checks, run once at start-up: values, a non-empty mixture, every file present and readable.

        Raises:
            FileNotFoundError: a source path does not exist.
            ValueError: no sources, an empty path, a mixture that takes nothing, an unsupported file
                extension, or an invalid value (see ``_check_values``).
        """
        self._check_values()
        if not self.sources:
            raise ValueError("DataConfig.sources is empty: give at least one prompt file")
        if all(src.excluded for src in self.sources):
            raise ValueError("every data source has share 0 or num_samples 0: the mixture would be empty")
        for src in self.sources:
            if not src.path:
                raise ValueError(f"data source {src.label!r} has an empty path")
            _check_source_path(src.path)

    def template_kwargs(self) -> dict[str, Any]:
        """The variables passed to the chat template besides the messages."""
        kwargs = dict(self.chat_template_kwargs)
        if self.enable_thinking is not None:
            kwargs["enable_thinking"] = self.enable_thinking
        return kwargs


def _default_source_name(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    for ext in JSON_EXTENSIONS + PARQUET_EXTENSIONS:
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return base


def _check_source_path(path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"prompt data not found: {path}")
    if os.path.isdir(path):
        return
    if not path.lower().endswith(JSON_EXTENSIONS + PARQUET_EXTENSIONS):
        raise ValueError(
            f"unsupported prompt file {path}: expected one of {JSON_EXTENSIONS + PARQUET_EXTENSIONS} "
            "or a directory written by datasets' save_to_disk"
        )


# ----------------------------------------------------------------------------------------------
# Reading records and rendering prompts


def load_records(path: str, split: str = "train", cache_dir: Optional[str] = None) -> datasets.Dataset:
    """Read a prompt file into a `datasets.Dataset` (all fields, unfiltered).

    Args:
        path: ``.jsonl`` / ``.json``, ``.parquet``, or a ``save_to_disk`` directory.
        split: the split to take when the directory holds a ``DatasetDict``.
        cache_dir: where ``datasets`` caches the converted jsonl / parquet (None: its default).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unsupported extension, unreadable file, unknown split, or a file without a
            ``prompt`` field.
    """
    _check_source_path(path)
    if _file_has_no_records(path):
        # datasets fails on these with a bare StopIteration or "corresponds to no data"; be plain.
        raise ValueError(f"prompt file {path} is empty: it has no records")
    try:
        if os.path.isdir(path):
            loaded = datasets.load_from_disk(path)
        else:
            builder = "parquet" if path.lower().endswith(PARQUET_EXTENSIONS) else "json"
            loaded = datasets.load_dataset(builder, data_files=path, split="train", cache_dir=cache_dir)
    except Exception as err:  # datasets / pyarrow raise many types; name the file in one place
        raise ValueError(f"could not read prompt data {path}: {type(err).__name__}: {err}") from err
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"{path} has no split {split!r} (splits: {sorted(loaded)})")
        loaded = loaded[split]
    if PROMPT_FIELD not in loaded.column_names:
        raise ValueError(f"{path}: records have no {PROMPT_FIELD!r} field (fields: {loaded.column_names})")
    return loaded


def _file_has_no_records(path: str) -> bool:
    """True for a whitespace-only json / jsonl file or a parquet file with zero rows."""
    if os.path.isdir(path):
        return False
    if path.lower().endswith(PARQUET_EXTENSIONS):
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows == 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def prompt_to_messages(prompt: Any) -> list[dict[str, str]]:
    """A record's ``prompt`` as chat messages: a string becomes one user message.

    Keys with a None value are dropped (columnar formats fill keys that only some messages have).

    Raises:
        ValueError: the prompt is missing, empty, or not a string / list of ``{"role", "content"}``.
    """
    if prompt is None:
        raise ValueError(f"record has no {PROMPT_FIELD!r}")
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise ValueError(
            f"{PROMPT_FIELD!r} must be a string or a non-empty list of chat messages, "
            f"got {type(prompt).__name__}"
        )
    messages = []
    for msg in prompt:
        if not (
            isinstance(msg, dict)
            and isinstance(msg.get("role"), str)
            and isinstance(msg.get("content"), str)
        ):
            raise ValueError(f"chat message must have string 'role' and 'content', got {msg!r}")
        messages.append({key: value for key, value in msg.items() if value is not None})
    return messages


def template_variables(tokenizer: PreTrainedTokenizerBase) -> Optional[frozenset[str]]:
    """Names the tokenizer's chat template reads, or None when the template cannot be analysed."""
    import jinja2
    from jinja2 import meta
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = tokenizer.get_chat_template()
    # transformers' `{% generation %}` tag is an extension plain Jinja does not know; it does not
    # read variables, so strip it before parsing.
    template = re.sub(r"{%-?\s*(end)?generation\s*-?%}", "", template)
    env = ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"])
    try:
        return frozenset(meta.find_undeclared_variables(env.parse(template)))
    except jinja2.TemplateError as err:
        logger.warning("cannot analyse the chat template (%s); template kwargs are not checked", err)
        return None


def check_template_kwargs(tokenizer: PreTrainedTokenizerBase, template_kwargs: dict[str, Any]) -> None:
    """Refuse template variables the chat template never reads (a typo would otherwise do nothing).

    Raises:
        ValueError: the tokenizer has no chat template, or a kwarg is not read by it.
    """
    if not tokenizer.chat_template:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template: prompts are rendered with one"
        )
    known = template_variables(tokenizer)
    if known is None:
        return
    unknown = sorted(set(template_kwargs) - known)
    if unknown:
        raise ValueError(
            f"chat template of {tokenizer.name_or_path!r} does not use {unknown}; it reads {sorted(known)}"
        )


def render_prompt_text(
    tokenizer: PreTrainedTokenizerBase, prompt: Any, template_kwargs: Optional[dict[str, Any]] = None
) -> str:
    """The prompt rendered with the tokenizer's chat template, ending with the generation prompt."""
    return tokenizer.apply_chat_template(
        prompt_to_messages(prompt), tokenize=False, add_generation_prompt=True, **(template_kwargs or {})
    )


def render_prompt_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: Any, template_kwargs: Optional[dict[str, Any]] = None
) -> list[int]:
    """Token ids of `render_prompt_text` (no extra BOS/EOS: the template writes all control tokens).

    Teachers with their own template call this on ``PromptRecord.messages`` with their own tokenizer.
    """
    return _encode(tokenizer, [render_prompt_text(tokenizer, prompt, template_kwargs)])[0]


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------------
# Tokenised sources and statistics


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
        return sum(s.rows for s in self.sources)

    @property
    def kept(self) -> int:
        return sum(s.kept for s in self.sources)

    @property
    def dropped_too_long(self) -> int:
        return sum(s.dropped_too_long for s in self.sources)

    @property
    def epoch_size(self) -> int:
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
        for row, ids in enumerate(_encode(tokenizer, texts), start=start):
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


# ----------------------------------------------------------------------------------------------
# Mixing


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


# ----------------------------------------------------------------------------------------------
# The dataset and the sampler


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
            extra={key: value for key, value in fields.items() if key not in _KNOWN_FIELDS},
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
        source = tokenize_source(
            src_cfg, records, tokenizer, template_kwargs, cfg.max_prompt_length, index_offset
        )
        _check_not_empty(source, cfg.max_prompt_length)
        sources.append(source)
        index_offset += len(records)
    dataset = PromptDataset(sources, cfg.default_domain)
    for stats in dataset.stats.sources:
        logger.info(
            "prompt source %s: %d records, %d kept, %d dropped as longer than max_prompt_length=%s, "
            "%d per epoch, prompt tokens mean %.1f max %d",
            stats.name, stats.rows, stats.kept, stats.dropped_too_long, cfg.max_prompt_length,
            stats.per_epoch, stats.mean_prompt_tokens, stats.max_prompt_tokens,
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
            raise ValueError(
                f"invalid prompt sampler position: epoch {state['epoch']}, position {state['position']}"
            )
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


# ----------------------------------------------------------------------------------------------
# Data parallelism

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
