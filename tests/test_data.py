"""Tests for the tiny tokenizer (megatron_gopd.testing) and the prompt data pipeline (megatron_gopd.data).

All data is generated under tmp_path; the tokenizer is built locally, nothing touches the network.
The tiny tokenizer has one token per character, so prompt lengths below are exact character counts.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any, Optional

import datasets
import pytest
from transformers import AutoTokenizer

from megatron_gopd.data import (
    DataConfig,
    DataSourceConfig,
    PromptRecord,
    PromptSampler,
    build_prompt_dataset,
    build_prompt_sampler,
    end_of_response_ids,
    load_records,
    mixture_counts,
    prompt_to_messages,
    render_prompt_ids,
    render_prompt_text,
    shard_for_rank,
)
from megatron_gopd.testing.tiny_tokenizer import (
    EOS_TOKEN_ID,
    IM_START_TOKEN_ID,
    PAD_TOKEN_ID,
    THINK_END_TOKEN_ID,
    THINK_START_TOKEN_ID,
    TINY_VOCAB_SIZE,
    UNK_TOKEN_ID,
    build_tiny_tokenizer,
)

GEN_PROMPT = "<|im_start|>assistant\n"
EMPTY_THINK = "<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def numbered(n: int, domain: Optional[str] = None, prefix: str = "q") -> list[dict[str, Any]]:
    """n plain prompts "q0", "q1", ... with answers, optionally with a domain field."""
    records = []
    for i in range(n):
        rec: dict[str, Any] = {"prompt": f"{prefix}{i}", "answer": str(i)}
        if domain is not None:
            rec["domain"] = domain
        records.append(rec)
    return records


def config(tmp_path: Path, sources: list[DataSourceConfig], **kwargs: Any) -> DataConfig:
    kwargs.setdefault("cache_dir", str(tmp_path / "hf_cache"))
    return DataConfig(sources=sources, **kwargs)


def keys(batch: list[PromptRecord]) -> list[tuple[int, int, tuple[int, ...]]]:
    """What must match between two runs: which prompt, which epoch, which tokens."""
    return [(r.index, r.epoch, tuple(r.input_ids)) for r in batch]


# ----------------------------------------------------------------------------------------------
# Tiny tokenizer


def test_tiny_tokenizer_special_tokens_and_vocab(tokenizer):
    assert len(tokenizer) == TINY_VOCAB_SIZE == 130  # golden: tiny models are built with this size
    assert TINY_VOCAB_SIZE <= 256
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", PAD_TOKEN_ID)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", EOS_TOKEN_ID)
    assert tokenizer.bos_token is None
    tokens = ["<|unk|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    constants = [
        UNK_TOKEN_ID,
        PAD_TOKEN_ID,
        IM_START_TOKEN_ID,
        EOS_TOKEN_ID,
        THINK_START_TOKEN_ID,
        THINK_END_TOKEN_ID,
    ]
    assert tokenizer.convert_tokens_to_ids(tokens) == constants == [124, 125, 126, 127, 128, 129]
    # pad != eos and pad != 0, so code that masks by pad id or assumes pad 0 fails loudly in tests.
    assert PAD_TOKEN_ID not in (0, EOS_TOKEN_ID)
    # As in Qwen3, the think markers are added tokens but not special: skip_special_tokens keeps them.
    ids = tokenizer("<think>x</think>y<|im_end|>", add_special_tokens=False).input_ids
    assert ids == [
        THINK_START_TOKEN_ID,
        tokenizer.convert_tokens_to_ids("x"),
        THINK_END_TOKEN_ID,
        tokenizer.convert_tokens_to_ids("y"),
        EOS_TOKEN_ID,
    ]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>x</think>y"
    # Deterministic: a second build has the same vocabulary.
    assert build_tiny_tokenizer().get_vocab() == tokenizer.get_vocab()


def test_tiny_tokenizer_encodes_arithmetic_and_code_exactly(tokenizer):
    text = "Compute 12 + 7*3 - (4/2)^2 = 29.\ndef f(x):\n\treturn x % 3 >= 1  # λ ≤ 2×π"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text)  # one token per character
    assert UNK_TOKEN_ID not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer("42", add_special_tokens=False).input_ids == [ord("4") - 0x20, ord("2") - 0x20]
    # A character outside the vocabulary becomes <|unk|>, never an error.
    unknown = tokenizer("a漢b", add_special_tokens=False).input_ids
    assert unknown == [ord("a") - 0x20, UNK_TOKEN_ID, ord("b") - 0x20]


def test_tiny_tokenizer_save_and_reload_offline(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    save_dir = tmp_path / "tok"
    build_tiny_tokenizer(str(save_dir))
    assert (save_dir / "tokenizer.json").is_file()
    reloaded = AutoTokenizer.from_pretrained(str(save_dir))
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    assert len(reloaded) == TINY_VOCAB_SIZE
    assert (reloaded.pad_token_id, reloaded.eos_token_id) == (PAD_TOKEN_ID, EOS_TOKEN_ID)
    messages = [{"role": "user", "content": "1+1?"}]
    for kwargs in ({}, {"enable_thinking": False}):
        rendered = [
            tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
            for tok in (reloaded, tokenizer)
        ]
        assert rendered[0] == rendered[1]
    text = "x = 3 * (2 + 5)\n"
    encoded = [tok(text, add_special_tokens=False).input_ids for tok in (reloaded, tokenizer)]
    assert encoded[0] == encoded[1]


def test_chat_template_renders_qwen3_format(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "<think>\nsum\n</think>\n\n2"},
        {"role": "user", "content": "2+2?"},
    ]
    history = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n"
        # Earlier turns lose their reasoning, as in Qwen3.
        "<|im_start|>assistant\n2<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
    )
    render = tokenizer.apply_chat_template
    assert render(messages, tokenize=False, add_generation_prompt=False) == history
    assert render(messages, tokenize=False, add_generation_prompt=True) == history + GEN_PROMPT
    thinking = render(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert thinking == history + GEN_PROMPT
    assert render(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False) == (
        history + GEN_PROMPT + EMPTY_THINK
    )


# ----------------------------------------------------------------------------------------------
# Rendering prompts


def test_plain_and_chat_prompts_rendered_with_template(tokenizer, tmp_path):
    chat = [{"role": "system", "content": "You are a solver."}, {"role": "user", "content": "Sum 2 and 3."}]
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "What is 2+3?", "domain": "math", "answer": "5", "level": 1},
            {"prompt": chat, "domain": "code", "tests": [{"input": "1", "output": "2"}], "level": 2},
        ],
    )
    cfg = config(tmp_path, [DataSourceConfig(path=path)], enable_thinking=False, shuffle=False)
    batch = build_prompt_sampler(cfg, tokenizer).next_batch(2)

    plain_text = "<|im_start|>user\nWhat is 2+3?<|im_end|>\n" + GEN_PROMPT + EMPTY_THINK
    chat_text = (
        "<|im_start|>system\nYou are a solver.<|im_end|>\n<|im_start|>user\nSum 2 and 3.<|im_end|>\n"
        + GEN_PROMPT
        + EMPTY_THINK
    )
    for record, text in zip(batch, (plain_text, chat_text)):
        assert tokenizer.decode(record.input_ids) == text
        assert record.input_ids == tokenizer(text, add_special_tokens=False).input_ids
        assert record.input_ids[0] == IM_START_TOKEN_ID  # no BOS is added on top of the template
    plain, chat_rec = batch
    assert plain.messages == [{"role": "user", "content": "What is 2+3?"}]
    assert (plain.domain, plain.answer, plain.tests, plain.extra) == ("math", "5", None, {"level": 1})
    assert chat_rec.messages == chat
    assert chat_rec.tests == [{"input": "1", "output": "2"}]
    assert (chat_rec.domain, chat_rec.extra) == ("code", {"level": 2})
    assert (plain.source, plain.index, chat_rec.index) == ("p", 0, 1)


def test_enable_thinking_false_adds_empty_think_block(tokenizer):
    base = "<|im_start|>user\nhi<|im_end|>\n" + GEN_PROMPT
    assert render_prompt_text(tokenizer, "hi") == base
    assert render_prompt_text(tokenizer, "hi", {"enable_thinking": True}) == base
    assert render_prompt_text(tokenizer, "hi", {"enable_thinking": False}) == base + EMPTY_THINK
    ids = render_prompt_ids(tokenizer, "hi", {"enable_thinking": False})
    newline = tokenizer.convert_tokens_to_ids("\n")
    assert ids[-6:] == [THINK_START_TOKEN_ID, newline, newline, THINK_END_TOKEN_ID, newline, newline]


def test_prompt_to_messages_validates():
    assert prompt_to_messages("x") == [{"role": "user", "content": "x"}]
    # Columnar formats fill keys only some messages have with None: those are dropped.
    filled = [{"role": "user", "content": "x", "name": None}]
    assert prompt_to_messages(filled) == [{"role": "user", "content": "x"}]
    for bad in (None, [], 3, [{"role": "user"}], [{"content": "x"}]):
        with pytest.raises(ValueError):
            prompt_to_messages(bad)


def test_domain_precedence(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "domain": "math"}, {"prompt": "b"}])
    other = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "c"}])
    cfg = config(
        tmp_path,
        [DataSourceConfig(path=path, domain="code"), DataSourceConfig(path=other)],
        default_domain="general",
        shuffle=False,
    )
    batch = build_prompt_sampler(cfg, tokenizer).next_batch(3)
    # The record's own field, then the source's domain, then the config default.
    assert [r.domain for r in batch] == ["math", "code", "general"]
    # Indices are unique across sources: the second source starts after the first file's rows.
    assert [r.index for r in batch] == [0, 1, 2]


# ----------------------------------------------------------------------------------------------
# Length filtering


def test_length_filter_drops_and_counts(tokenizer, tmp_path):
    overhead = len(render_prompt_ids(tokenizer, ""))  # template tokens around an empty prompt
    lengths = [5, 10, 11, 50, 3]
    records = [{"prompt": "x" * n, "answer": str(n)} for n in lengths]
    path = write_jsonl(tmp_path / "len.jsonl", records)
    cfg = config(tmp_path, [DataSourceConfig(path=path)], max_prompt_length=overhead + 10, shuffle=False)
    dataset = build_prompt_dataset(cfg, tokenizer)
    stats = dataset.stats.sources[0]
    assert (stats.rows, stats.kept, stats.dropped_too_long) == (5, 3, 2)
    assert stats.max_prompt_tokens == overhead + 10
    assert stats.mean_prompt_tokens == pytest.approx(overhead + (5 + 10 + 3) / 3)
    assert dataset.stats.to_dict()["data/dropped_too_long"] == 2
    assert dataset.stats.to_dict()["data/len/kept"] == 3
    batch = PromptSampler(dataset, seed=0, shuffle=False).next_batch(3)
    # Kept prompts keep their original row numbers as indices.
    assert [(r.index, r.answer) for r in batch] == [(0, "5"), (1, "10"), (4, "3")]
    assert all(len(r.input_ids) <= overhead + 10 for r in batch)


def test_all_prompts_too_long_is_a_clear_error(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "x" * 100}] * 3)
    cfg = config(tmp_path, [DataSourceConfig(path=path)], max_prompt_length=20)
    with pytest.raises(ValueError, match="all 3 prompts are longer than max_prompt_length=20"):
        build_prompt_dataset(cfg, tokenizer)


# ----------------------------------------------------------------------------------------------
# Mixing


def test_mixture_counts():
    # No shares: every source contributes all its prompts.
    assert mixture_counts([40, 10], [None, None], [None, None]) == [40, 10]
    # Equal shares: down-sample to the smaller source (the paper's math vs code).
    assert mixture_counts([40, 10], [1.0, 1.0], [None, None]) == [10, 10]
    assert mixture_counts([40, 10], [0.5, 0.5], [None, None]) == [10, 10]
    # 2:1, limited by whichever source runs out first.
    assert mixture_counts([40, 10], [2.0, 1.0], [None, None]) == [20, 10]
    assert mixture_counts([40, 100], [2.0, 1.0], [None, None]) == [40, 20]
    # Explicit counts: down-sample math to N, up-sample beyond the size, mixed with shares.
    assert mixture_counts([40, 10], [None, None], [10, None]) == [10, 10]
    assert mixture_counts([40, 10], [None, None], [None, 25]) == [40, 25]
    assert mixture_counts([40, 10, 30], [None, 1.0, 1.0], [5, None, None]) == [5, 10, 10]
    # Share 0 excludes a source.
    assert mixture_counts([40, 10], [1.0, 0.0], [None, None]) == [40, 0]
    with pytest.raises(ValueError, match="share"):
        mixture_counts([40, 10], [1.0, None], [None, None])


def count_sources(batch: list[PromptRecord]) -> dict[str, int]:
    return dict(collections.Counter(r.source for r in batch))


def test_equal_shares_downsample_to_the_smaller_source(tokenizer, tmp_path):
    math_path = write_jsonl(tmp_path / "math.jsonl", numbered(40, "math", "m"))
    code_path = write_jsonl(tmp_path / "code.jsonl", numbered(10, "code", "c"))
    sources = [DataSourceConfig(path=math_path, share=1.0), DataSourceConfig(path=code_path, share=1.0)]
    sampler = build_prompt_sampler(config(tmp_path, sources), tokenizer)
    assert sampler.epoch_size == 20
    assert sampler.dataset.stats.to_dict()["data/math/per_epoch"] == 10
    epochs = [sampler.next_batch(20) for _ in range(3)]
    math_subsets = []
    for epoch, batch in enumerate(epochs):
        assert count_sources(batch) == {"math": 10, "code": 10}
        assert {r.epoch for r in batch} == {epoch}
        assert len({r.index for r in batch}) == 20  # no prompt twice within an epoch
        assert {r.index for r in batch if r.source == "code"} == set(range(40, 50))  # all of code
        math_subsets.append(frozenset(r.index for r in batch if r.source == "math"))
    # Each epoch draws a fresh math subset.
    assert len(set(math_subsets)) == 3


def test_num_samples_downsamples_and_upsamples(tokenizer, tmp_path):
    math_path = write_jsonl(tmp_path / "math.jsonl", numbered(40, "math", "m"))
    code_path = write_jsonl(tmp_path / "code.jsonl", numbered(10, "code", "c"))
    cfg = config(
        tmp_path, [DataSourceConfig(path=math_path, num_samples=15), DataSourceConfig(path=code_path, num_samples=25)]
    )
    batch = build_prompt_sampler(cfg, tokenizer).next_batch(40)
    assert count_sources(batch) == {"math": 15, "code": 25}
    assert len({r.index for r in batch if r.source == "math"}) == 15
    code_counts = collections.Counter(r.index for r in batch if r.source == "code")
    # 25 of 10: two whole passes plus 5 more, so each code prompt appears 2 or 3 times.
    assert set(code_counts) == set(range(40, 50)) and set(code_counts.values()) == {2, 3}


def test_weighted_shares_per_source_counts(tokenizer, tmp_path):
    paths = [write_jsonl(tmp_path / f"s{i}.jsonl", numbered(30, prefix=f"s{i}-")) for i in range(3)]
    cfg = config(tmp_path, [DataSourceConfig(path=p, share=s) for p, s in zip(paths, (3.0, 2.0, 1.0))])
    sampler = build_prompt_sampler(cfg, tokenizer)
    assert sampler.dataset.epoch_counts == [30, 20, 10]
    assert count_sources(sampler.next_batch(60)) == {"s0": 30, "s1": 20, "s2": 10}


# ----------------------------------------------------------------------------------------------
# Shuffling, resuming, sharding


def indices(sampler: PromptSampler, n: int) -> list[int]:
    return [r.index for r in sampler.next_batch(n)]


def test_shuffling_is_deterministic_per_seed_and_epoch(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", numbered(30))
    dataset = build_prompt_dataset(config(tmp_path, [DataSourceConfig(path=path)]), tokenizer)
    first = indices(PromptSampler(dataset, seed=7), 90)
    assert first == indices(PromptSampler(dataset, seed=7), 90)
    assert first != indices(PromptSampler(dataset, seed=8), 90)
    epochs = [first[0:30], first[30:60], first[60:90]]
    assert all(sorted(e) == list(range(30)) for e in epochs)  # each epoch is a permutation
    assert len({tuple(e) for e in epochs}) == 3  # reshuffled every epoch
    assert epochs[0] != list(range(30))
    assert indices(PromptSampler(dataset, seed=7, shuffle=False), 35) == list(range(30)) + list(range(5))


def test_resume_gives_identical_following_batches(tokenizer, tmp_path):
    math_path = write_jsonl(tmp_path / "math.jsonl", numbered(23, "math", "m"))
    code_path = write_jsonl(tmp_path / "code.jsonl", numbered(9, "code", "c"))
    sources = [DataSourceConfig(path=math_path, share=1.0), DataSourceConfig(path=code_path, share=1.0)]
    cfg = config(tmp_path, sources, seed=3)
    uninterrupted = build_prompt_sampler(cfg, tokenizer)
    for _ in range(3):  # 21 prompts: past the first epoch boundary (18)
        uninterrupted.next_batch(7)
    state = json.loads(json.dumps(uninterrupted.state_dict()))  # as a checkpoint would store it
    assert (state["epoch"], state["position"]) == (1, 3)
    expected = [keys(uninterrupted.next_batch(7)) for _ in range(4)]

    resumed = build_prompt_sampler(cfg, tokenizer)  # a fresh process would rebuild from the config
    resumed.load_state_dict(state)
    assert [keys(resumed.next_batch(7)) for _ in range(4)] == expected
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_resume_refuses_other_seed_or_data(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", numbered(10))
    dataset = build_prompt_dataset(config(tmp_path, [DataSourceConfig(path=path)]), tokenizer)
    state = PromptSampler(dataset, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        PromptSampler(dataset, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="epoch_counts"):
        PromptSampler(dataset, seed=1).load_state_dict({**state, "epoch_counts": [11]})
    with pytest.raises(ValueError, match="position"):
        PromptSampler(dataset, seed=1).load_state_dict({**state, "position": 11})


def test_dp_sharding_is_disjoint_and_complete(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", numbered(30))
    sampler = build_prompt_sampler(config(tmp_path, [DataSourceConfig(path=path)]), tokenizer)
    batch = sampler.next_batch(12)
    shards = [shard_for_rank(batch, rank, 4) for rank in range(4)]
    assert all(len(s) == 3 for s in shards)
    assert [r.index for s in shards for r in s] == [r.index for r in batch]  # disjoint, complete, in order
    assert shard_for_rank(batch, 2, 4) == shards[2]  # deterministic
    with pytest.raises(ValueError, match="divide"):
        shard_for_rank(batch, 0, 5)
    with pytest.raises(ValueError, match="rank"):
        shard_for_rank(batch, 4, 4)


# ----------------------------------------------------------------------------------------------
# File formats


def test_jsonl_parquet_and_saved_directory_load_the_same(tokenizer, tmp_path):
    records = [
        {"prompt": "What is 3*4?", "domain": "math", "answer": "12"},
        {"prompt": "Add 1 and 2.", "domain": "math", "answer": "3"},
    ]
    jsonl = write_jsonl(tmp_path / "a.jsonl", records)
    table = datasets.Dataset.from_list(records)
    parquet = str(tmp_path / "a.parquet")
    table.to_parquet(parquet)
    saved = str(tmp_path / "saved")
    table.save_to_disk(saved)
    saved_dict = str(tmp_path / "saved_dict")
    datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(saved_dict)

    def load(source: DataSourceConfig) -> list[tuple]:
        batch = build_prompt_sampler(config(tmp_path, [source], shuffle=False), tokenizer).next_batch(2)
        return [(r.input_ids, r.domain, r.answer, r.messages) for r in batch]

    expected = load(DataSourceConfig(path=jsonl))
    assert [e[2] for e in expected] == ["12", "3"]
    assert load(DataSourceConfig(path=parquet)) == expected
    assert load(DataSourceConfig(path=saved)) == expected
    assert load(DataSourceConfig(path=saved_dict, split="train")) == expected
    assert len(load_records(saved_dict, split="test")) == 1
    with pytest.raises(ValueError, match="no split 'dev'"):
        load_records(saved_dict, split="dev")


# ----------------------------------------------------------------------------------------------
# Configuration and bad input


def test_config_fields_are_documented_plain_types():
    """The generic YAML loader fills these dataclasses: plain field types, a docstring under each field."""
    import ast
    import inspect
    import typing

    import megatron_gopd.data.config as data_module

    plain = (str, int, float, bool, list, dict, typing.Union, DataSourceConfig, typing.Any)
    tree = ast.parse(inspect.getsource(data_module))
    for cls in (DataConfig, DataSourceConfig):
        for name, hint in typing.get_type_hints(cls).items():
            origin = typing.get_origin(hint) or hint
            assert origin in plain, f"{cls.__name__}.{name}: {hint}"
            for arg in typing.get_args(hint):
                arg_origin = typing.get_origin(arg) or arg
                assert arg_origin in plain + (type(None),), f"{cls.__name__}.{name}: {hint}"
        body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__).body
        for stmt, following in zip(body, body[1:]):
            if isinstance(stmt, ast.AnnAssign):
                assert isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant), (
                    f"{cls.__name__}.{stmt.target.id} has no docstring"
                )


def test_config_dict_sources_are_coerced(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", numbered(2))
    cfg = DataConfig(sources=[{"path": path, "share": 2.0}], enable_thinking=False, chat_template_kwargs={"foo": 1})
    assert isinstance(cfg.sources[0], DataSourceConfig) and cfg.sources[0].label == "p"
    assert cfg.template_kwargs() == {"foo": 1, "enable_thinking": False}


def test_default_configs_construct_and_validate_refuses_them():
    # A config loader may build the defaults first and fill them in later: construction must work.
    DataSourceConfig()
    with pytest.raises(ValueError, match="sources is empty"):
        DataConfig().validate()
    with pytest.raises(ValueError, match="empty path"):
        DataConfig(sources=[DataSourceConfig()]).validate()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_prompt_length": 0}, "max_prompt_length"),
        ({"chat_template_kwargs": {"add_generation_prompt": False}}, "may not set"),
        ({"chat_template_kwargs": {"enable_thinking": False}}, "may not set"),
    ],
)
def test_config_value_errors(tmp_path, kwargs, match):
    kwargs.setdefault("sources", [DataSourceConfig(path=str(tmp_path / "p.jsonl"))])
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)


def test_source_config_value_errors(tmp_path):
    path = str(tmp_path / "p.jsonl")
    with pytest.raises(ValueError, match="share must be"):
        DataSourceConfig(path=path, share=-1.0)
    with pytest.raises(ValueError, match="share must be"):
        DataSourceConfig(path=path, share=float("nan"))
    with pytest.raises(ValueError, match="num_samples"):
        DataSourceConfig(path=path, num_samples=-3)
    with pytest.raises(ValueError, match="set a share on every source"):
        DataConfig(sources=[DataSourceConfig(path=path, share=1.0), DataSourceConfig(path=path + ".q.jsonl")])
    with pytest.raises(ValueError, match="distinct `name`"):
        same_stem = str(tmp_path / "b" / "p.jsonl")
        DataConfig(sources=[DataSourceConfig(path=path), DataSourceConfig(path=same_stem)])
    # A distinct name resolves the clash.
    DataConfig(sources=[DataSourceConfig(path=path), DataSourceConfig(path=path, name="again")])
    with pytest.raises(ValueError, match="mixture would be empty"):
        DataConfig(sources=[DataSourceConfig(path=path, share=0.0)]).validate()


def test_missing_file_and_unsupported_extension(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        missing = DataSourceConfig(path=str(tmp_path / "missing.jsonl"))
        build_prompt_dataset(config(tmp_path, [missing]), tokenizer)
    csv = tmp_path / "p.csv"
    csv.write_text("prompt\nhi\n")
    with pytest.raises(ValueError, match="unsupported prompt file"):
        config(tmp_path, [DataSourceConfig(path=str(csv))]).validate()


def test_records_without_prompt(tokenizer, tmp_path):
    no_field = write_jsonl(tmp_path / "nofield.jsonl", [{"question": "hi"}])
    with pytest.raises(ValueError, match="no 'prompt' field"):
        build_prompt_dataset(config(tmp_path, [DataSourceConfig(path=no_field)]), tokenizer)
    one_null = write_jsonl(tmp_path / "null.jsonl", [{"prompt": "hi"}, {"question": "x"}])
    with pytest.raises(ValueError, match="record 1: record has no 'prompt'"):
        build_prompt_dataset(config(tmp_path, [DataSourceConfig(path=one_null)]), tokenizer)


def test_empty_file_is_a_clear_error(tokenizer, tmp_path):
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n")
    empty_parquet = str(tmp_path / "empty.parquet")
    features = datasets.Features({"prompt": datasets.Value("string")})
    datasets.Dataset.from_dict({"prompt": []}, features=features).to_parquet(empty_parquet)
    for path in (str(blank), empty_parquet):
        with pytest.raises(ValueError, match="is empty: it has no records"):
            build_prompt_dataset(config(tmp_path, [DataSourceConfig(path=path)]), tokenizer)


def test_unknown_template_kwarg_is_refused(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", numbered(2))
    cfg = config(tmp_path, [DataSourceConfig(path=path)], chat_template_kwargs={"enable_thinkng": False})
    with pytest.raises(ValueError, match=r"does not use \['enable_thinkng'\]"):
        build_prompt_dataset(cfg, tokenizer)


# ----------------------------------------------------------------------------------------------
# End-of-response ids


def test_end_of_response_ids_add_the_generation_config_eos_list(tmp_path):
    """Llama 3 lists several EOS ids in generation_config.json; every one ends a response."""
    tokenizer = build_tiny_tokenizer()
    base = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    assert end_of_response_ids(tokenizer) == sorted(base)
    assert end_of_response_ids(tokenizer, str(tmp_path)) == sorted(base)  # no generation_config.json
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert end_of_response_ids(tokenizer, str(tmp_path)) == sorted(base | {7, 9})
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 11}))
    assert end_of_response_ids(tokenizer, str(tmp_path)) == sorted(base | {11})
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": ["<eot>"]}))
    with pytest.raises(ValueError, match=r"generation_config.json: eos_token_id must be a token id"):
        end_of_response_ids(tokenizer, str(tmp_path))
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"generation_config.json: not a JSON object"):
        end_of_response_ids(tokenizer, str(tmp_path))
