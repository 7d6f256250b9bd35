"""Prompt files and their records: the field names, the accepted formats, reading a file.

A prompt file (jsonl / json, parquet, or a directory written by ``datasets.Dataset.save_to_disk``)
holds one record per prompt; see the package docstring for the fields.
"""

from __future__ import annotations

import os
from typing import Optional

import datasets

PROMPT_FIELD = "prompt"
DOMAIN_FIELD = "domain"
ANSWER_FIELD = "answer"
TESTS_FIELD = "tests"
KNOWN_FIELDS = (PROMPT_FIELD, DOMAIN_FIELD, ANSWER_FIELD, TESTS_FIELD)

JSON_EXTENSIONS = (".jsonl", ".json")
PARQUET_EXTENSIONS = (".parquet",)


def default_source_name(path: str) -> str:
    """The file (or directory) name of a prompt source without its extension."""
    base = os.path.basename(os.path.normpath(path))
    for ext in JSON_EXTENSIONS + PARQUET_EXTENSIONS:
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return base


def check_source_path(path: str) -> None:
    """Refuse a prompt source that does not exist or has an extension no reader takes."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"prompt data not found: {path}")
    if os.path.isdir(path):
        return
    if not path.lower().endswith(JSON_EXTENSIONS + PARQUET_EXTENSIONS):
        raise ValueError(
            f"unsupported prompt file {path}: expected one of {JSON_EXTENSIONS + PARQUET_EXTENSIONS} "
            "or a directory written by datasets' save_to_disk"
        )


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
    check_source_path(path)
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
