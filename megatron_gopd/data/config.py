"""The data config: prompt sources, their mixture, chat-template variables, length limit, shuffling."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_gopd.data.chat import RESERVED_TEMPLATE_KWARGS
from megatron_gopd.data.records import check_source_path, default_source_name


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
            raise ValueError(f"data source {self.label!r}: share must be a finite number >= 0, got {self.share}")
        if self.num_samples is not None and self.num_samples < 0:
            raise ValueError(f"data source {self.label!r}: num_samples must be >= 0, got {self.num_samples}")

    @property
    def label(self) -> str:
        """``name``, or the file name without extension when ``name`` is unset."""
        return self.name or default_source_name(self.path)

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
        self.sources = [DataSourceConfig(**src) if isinstance(src, dict) else src for src in self.sources]
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
        reserved = sorted(RESERVED_TEMPLATE_KWARGS & set(self.chat_template_kwargs))
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
            check_source_path(src.path)

    def template_kwargs(self) -> dict[str, Any]:
        """The variables passed to the chat template besides the messages."""
        kwargs = dict(self.chat_template_kwargs)
        if self.enable_thinking is not None:
            kwargs["enable_thinking"] = self.enable_thinking
        return kwargs
