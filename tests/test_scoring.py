"""The teacher / reference pool (megatron_gopd.scoring) on 4 gloo ranks, and its validation.

Tiny random `transformers` models (vocabulary of the tiny tokenizer, 130 tokens) are converted into
Megatron checkpoints once per module. One 4-rank launch then builds a pool beside a TP=1/DP=4
student: teachers at TP=2/PP=2 (DP=1), TP=1 (the student's layout: no redistribution), TP=1/PP=2
(DP=2), TP=2 (DP=2) and a Qwen3-MoE teacher at EP=2, a shared reward-correction reference at TP=2
and the built-in ``student_init`` reference. Every log-prob the pool returns must equal the same
model run alone at TP=1 on the unpadded sequence (full forward, log_softmax, gather) within 1e-5
fp32, and each model must have run exactly the requests routed to it. A second, smaller pool beside
a TP=1/PP=2 student covers the no-redistribution path across pipeline stages.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from megatron_gopd.config import ConfigError, from_dict
from megatron_gopd.scoring import (
    STUDENT_INIT,
    PoolModelConfig,
    ScoringConfig,
    ScoringConfigError,
    ScoringPlan,
    TeacherConfig,
    validate_scoring_config,
)
from megatron_gopd.testing.tiny_tokenizer import CHAT_TEMPLATE, TINY_VOCAB_SIZE, build_tiny_tokenizer
from tests.dist_harness import run_distributed

TOL = 1e-5
SMALL = dict(
    vocab_size=TINY_VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    initializer_range=0.2,
)  # wide init: models disagree visibly
# A teacher whose chat template differs from the student's (no think block, other role markers):
# the pool must render its prompts with it and append the student's response ids unchanged.
OTHER_TEMPLATE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + ':' + m.content + '<|im_end|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant:' }}{%- endif %}"
)
STUDENT_TEMPLATE_KWARGS = {"enable_thinking": False}


def _save_hf_model(
    root: Path,
    name: str,
    seed: int,
    moe: bool = False,
    template: str = CHAT_TEMPLATE,
    extra_token: bool = False,
    tied: bool = False,
) -> Path:
    hf_dir = root / f"hf_{name}"
    torch.manual_seed(seed)
    shape = {**SMALL, "tie_word_embeddings": tied}
    if moe:
        model = Qwen3MoeForCausalLM(
            Qwen3MoeConfig(**shape, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)
        )
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**shape))
    model.save_pretrained(hf_dir)
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = template
    if extra_token:
        tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(hf_dir)
    return hf_dir


def _convert_body(rank: int, world_size: int, jobs: list[tuple[str, str]]) -> None:
    from megatron_gopd.bridge.convert import hf_to_mcore
    from megatron_gopd.models import ParallelLayout

    for hf_dir, out in jobs:
        hf_to_mcore(hf_dir, out, ParallelLayout())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """Converted checkpoints: student, math / code / moe teachers, the math teacher's base."""
    root = tmp_path_factory.mktemp("scoring")
    sources = {
        "student": _save_hf_model(root, "student", seed=0),
        "math": _save_hf_model(root, "math", seed=1, tied=True),  # tied, as Qwen3's small models
        "code": _save_hf_model(root, "code", seed=2, template=OTHER_TEMPLATE),
        "math_base": _save_hf_model(root, "math_base", seed=3),
        "moe": _save_hf_model(root, "moe", seed=4, moe=True),
    }
    ckpts = {name: str(root / f"ckpt_{name}") for name in sources}
    run_distributed(_convert_body, world_size=4, jobs=[(str(sources[n]), ckpts[n]) for n in sources])
    # Checkpoints that must be refused: another tokenizer (one token more), a bare HF directory.
    bad_vocab = root / "ckpt_bad_vocab"
    shutil.copytree(ckpts["math"], bad_vocab)
    _save_hf_model(root, "bad_vocab", seed=5, extra_token=True)
    for f in (root / "hf_bad_vocab").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "added_tokens", "chat_template")):
            shutil.copy(f, bad_vocab / "hf" / f.name)
    ckpts["bad_vocab"] = str(bad_vocab)
    # Same tokenizer, more embedding rows (a padded vocabulary): refused at start-up too.
    bad_size = root / "ckpt_bad_vocab_size"
    shutil.copytree(ckpts["math"], bad_size)
    config = json.loads((bad_size / "hf" / "config.json").read_text())
    (bad_size / "hf" / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 2}))
    ckpts["bad_vocab_size"] = str(bad_size)
    ckpts["not_converted"] = str(sources["math"])
    ckpts["missing"] = str(root / "does_not_exist")
    return ckpts


# ----------------------------------------------------------------------------------------------
# Rank bodies


def _requests(rank: int, num: int, domains: list[str], seed: int) -> list[dict[str, Any]]:
    """`num` random rollouts for this rank: chat messages, student prompt ids, response ids."""
    from megatron_gopd.data import render_prompt_ids
    from megatron_gopd.testing.tiny_tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    rng = random.Random(seed * 100 + rank)
    out = []
    for i in range(num):
        text = "".join(rng.choice("abcdefgh 0123456789+=?") for _ in range(rng.randint(1, 12)))
        messages = [{"role": "user", "content": text}]
        out.append(
            dict(
                domain=domains[(rank + i) % len(domains)],
                messages=messages,
                prompt_ids=render_prompt_ids(tokenizer, messages, STUDENT_TEMPLATE_KWARGS),
                # any id of the vocabulary, special tokens included
                response_ids=[rng.randrange(TINY_VOCAB_SIZE) for _ in range(rng.randint(1, 24))],
            )
        )
    return out


class _Standalone:
    """Each model alone at TP=1 (Megatron's global parallel state, which the student's TP=1 sets)."""

    def __init__(self, checkpoints: dict[str, str], names: list[str]) -> None:
        from megatron_gopd.checkpointing import load_model
        from megatron_gopd.models import ParallelLayout

        # Loading is collective: every rank loads every model, in the same order.
        self.models = {}
        for name in names:
            model, arch = load_model(checkpoints[name], ParallelLayout())
            self.models[name] = (model.eval(), arch)

    def log_softmax(self, ckpt_name: str, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
        """[len(response_ids), V] the model's next-token log-probs at each response position."""
        model, arch = self.models[ckpt_name]
        tokens = torch.tensor([prompt_ids + response_ids])
        with torch.no_grad():
            logits = model(tokens, torch.arange(tokens.shape[1])[None], None)[0]  # [s, V_padded]
        logp = logits[:, : arch.vocab_size].float().log_softmax(-1)  # real vocabulary only
        start = len(prompt_ids) - 1  # position t predicts token t + 1
        return logp[start : start + len(response_ids)]

    def logprobs(self, ckpt_name: str, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
        logp = self.log_softmax(ckpt_name, prompt_ids, response_ids)
        return logp.gather(1, torch.tensor(response_ids)[:, None])[:, 0]


def _count_groups():
    """Wrap dist.new_group / destroy_process_group to count the pool's live process groups."""
    import torch.distributed as dist

    counts = {"created": 0, "destroyed": 0}
    new_group, destroy = dist.new_group, dist.destroy_process_group

    def counting_new_group(*args, **kwargs):
        group = new_group(*args, **kwargs)
        counts["created"] += isinstance(group, dist.ProcessGroup)
        return group

    def counting_destroy(group=None):
        counts["destroyed"] += 1
        return destroy(group)

    dist.new_group, dist.destroy_process_group = counting_new_group, counting_destroy

    def restore() -> None:
        dist.new_group, dist.destroy_process_group = new_group, destroy

    return counts, restore


def _count_model_loads():
    """Record the name of every model the pool builds; returns (names, restore)."""
    from megatron_gopd.scoring import pool

    loads: list[str] = []
    original = pool.load_pool_model

    def counting_load(plan, pg_collection):
        loads.append(plan.name)
        return original(plan, pg_collection)

    pool.load_pool_model = counting_load
    return loads, lambda: setattr(pool, "load_pool_model", original)


def _check_topk(score, request, expectation, standalone, renderers, topk: int) -> dict:
    """Top-k fields of one SampleScores against the standalone models' full distributions."""
    teacher_ckpt, _, ref_ckpt = expectation
    full = standalone.log_softmax(teacher_ckpt, renderers[teacher_ckpt](request), request["response_ids"])
    want = full.topk(topk, dim=-1)
    row = dict(
        topk_shape=tuple(score.teacher_topk_ids.shape),
        topk_ids_dtype=str(score.teacher_topk_ids.dtype),
        topk_value_diff=(score.teacher_topk_logprobs - want.values).abs().max().item(),
        # ids may differ only where two logits tie exactly (then their values agree anyway)
        topk_id_diff=(full.gather(1, score.teacher_topk_ids) - want.values).abs().max().item(),
        ref_topk_none=score.ref_topk_logprobs is None,
    )
    if ref_ckpt is not None and score.ref_topk_logprobs is not None:
        ref_full = standalone.log_softmax(ref_ckpt, renderers[ref_ckpt](request), request["response_ids"])
        row["ref_topk_diff"] = (score.ref_topk_logprobs - ref_full.gather(1, score.teacher_topk_ids)).abs().max().item()
    return row


def _check_scores(scores, requests, expectations, standalone, renderers, topk: int = 0) -> list[dict]:
    """Compare each SampleScores with the standalone models; one row per request for the parent."""
    rows = []
    for request, score in zip(requests, scores):
        teacher_ckpt, lam, ref_ckpt = expectations[request["domain"]]
        prompt = renderers[teacher_ckpt](request)
        expected_teacher = standalone.logprobs(teacher_ckpt, prompt, request["response_ids"])
        row = dict(
            domain=request["domain"],
            teacher=score.teacher,
            lam=score.lam,
            teacher_shape=tuple(score.teacher_logprobs.shape),
            dtype=str(score.teacher_logprobs.dtype),
            n=len(request["response_ids"]),
            tokens=len(prompt) + len(request["response_ids"]),
            teacher_diff=(score.teacher_logprobs - expected_teacher).abs().max().item(),
            ref_none=score.ref_logprobs is None,
            ref_diff=None,
        )
        if ref_ckpt is not None and score.ref_logprobs is not None:
            ref_prompt = renderers[ref_ckpt](request)
            expected_ref = standalone.logprobs(ref_ckpt, ref_prompt, request["response_ids"])
            row["ref_diff"] = (score.ref_logprobs - expected_ref).abs().max().item()
            row["ref_tokens"] = len(ref_prompt) + len(request["response_ids"])
            # The routing check below is only meaningful if the models visibly disagree.
            row["teacher_vs_ref"] = (expected_teacher - expected_ref).abs().max().item()
        row["topk"] = topk
        if topk:
            row.update(_check_topk(score, request, expectations[request["domain"]], standalone, renderers, topk))
        else:
            row["topk_none"] = (
                score.teacher_topk_ids is None
                and score.teacher_topk_logprobs is None
                and score.ref_topk_logprobs is None
            )
        rows.append(row)
    return rows


def _pool_body(rank: int, world_size: int, checkpoints: dict[str, str]) -> dict:
    from megatron_gopd import platform
    from megatron_gopd.data import render_prompt_ids
    from megatron_gopd.models import ParallelLayout
    from megatron_gopd.scoring import ScoreRequest, ScoringPool, UnroutedDomainError
    from megatron_gopd.testing.tiny_tokenizer import build_tiny_tokenizer

    other = build_tiny_tokenizer()
    other.chat_template = OTHER_TEMPLATE
    renderers = {name: (lambda r: r["prompt_ids"]) for name in checkpoints}
    renderers["code"] = lambda r: render_prompt_ids(other, r["messages"])

    platform.init_model_parallel(tp=1, pp=1)  # the student: TP=1, DP=4
    counts, restore = _count_groups()
    loads, restore_loads = _count_model_loads()
    cfg = ScoringConfig(
        teachers={
            "math": TeacherConfig(
                model=PoolModelConfig(checkpoints["math"], tp=2, pp=2),
                domains=["math"],
                lam=1.25,
                reference="math_base",
            ),
            "code": TeacherConfig(model=PoolModelConfig(checkpoints["code"], tp=1), domains=["code"], lam=0.5),
            "physics": TeacherConfig(
                model=PoolModelConfig(checkpoints["math"], tp=1, pp=2),
                domains=["physics", "chemistry"],
                lam=2.0,
                reference="math_base",
            ),
            "chat": TeacherConfig(model=PoolModelConfig(checkpoints["math_base"], tp=2), domains=["chat"]),
            "moe": TeacherConfig(model=PoolModelConfig(checkpoints["moe"], ep=2), domains=["moe"], lam=0.8),
            # MoE under TP needs sequence parallelism: sequences are padded to a multiple of TP.
            "moe_sp": TeacherConfig(model=PoolModelConfig(checkpoints["moe"], tp=2, ep=2), domains=["moe_sp"]),
        },
        references={
            "math_base": PoolModelConfig(checkpoints["math_base"], tp=2),
            "unused": PoolModelConfig(checkpoints["math"]),
        },
        micro_batch_tokens=100,  # a few packed sequences per micro-batch, several per replica
    )
    pool = ScoringPool(cfg, student_checkpoint=checkpoints["student"], student_layout=ParallelLayout())
    # teacher checkpoint, lam, reference checkpoint (None: no reference run)
    expectations = {
        "math": ("math", 1.25, "math_base"),
        "code": ("code", 0.5, "student"),
        "physics": ("math", 2.0, "math_base"),
        "chemistry": ("math", 2.0, "math_base"),
        "chat": ("math_base", 1.0, None),
        "moe": ("moe", 0.8, "student"),
        "moe_sp": ("moe", 1.0, None),
    }
    standalone = _Standalone(checkpoints, ["student", "math", "code", "math_base", "moe"])
    report: dict[str, Any] = {"rows": []}

    # Call 1: every domain; rank 3's shard is empty.
    requests = _requests(rank, 0 if rank == 3 else 7, list(expectations), seed=1)
    scores = pool.score([ScoreRequest(**r) for r in requests])
    report["rows"] += _check_scores(scores, requests, expectations, standalone, renderers)
    # Call 2: math only, uneven shards (models without work anywhere are skipped).
    requests = _requests(rank, [3, 1, 0, 2][rank], ["math"], seed=2)
    scores = pool.score([ScoreRequest(**r) for r in requests])
    report["rows"] += _check_scores(scores, requests, expectations, standalone, renderers)
    # Call 3: every domain with the teachers' top-5 (and the references' log-probs of those ids).
    requests = _requests(rank, [4, 4, 3, 4][rank], list(expectations), seed=4)
    scores = pool.score([ScoreRequest(**r) for r in requests], topk=5)
    report["rows"] += _check_scores(scores, requests, expectations, standalone, renderers, topk=5)
    try:
        pool.score([ScoreRequest(**r) for r in requests], topk=TINY_VOCAB_SIZE + 1)
    except ValueError as err:
        report["topk_error"] = str(err)

    report["teacher_for"] = {d: pool.teacher_for(d) for d in expectations}
    try:
        pool.teacher_for("poetry")
    except UnroutedDomainError as err:
        report["teacher_for_error"] = str(err)
    # An unrouted domain on one rank fails score() on every rank, before any model runs.
    bad = [ScoreRequest("poetry", [1, 2], [3])] if rank == 0 else []
    try:
        pool.score(bad)
    except (UnroutedDomainError, RuntimeError) as err:
        report["score_error"] = f"{type(err).__name__}: {err}"
    report["stats"] = {name: vars(s) for name, s in pool.stats.items()}
    pool.close()
    report["groups"] = dict(counts)
    report["model_loads"] = loads
    restore()
    restore_loads()
    return report


def _pipeline_student_body(rank: int, world_size: int, checkpoints: dict[str, str]) -> dict:
    """Student at TP=1/PP=2: a teacher at the same layout and student_init need no redistribution."""
    from megatron_gopd import platform
    from megatron_gopd.models import ParallelLayout
    from megatron_gopd.scoring import ScoreRequest, ScoringPool

    platform.init_model_parallel(tp=1, pp=2)
    cfg = ScoringConfig(
        teachers={"math": TeacherConfig(model=PoolModelConfig(checkpoints["math"], pp=2), domains=["math"], lam=1.5)},
        micro_batch_tokens=40,
    )
    # Validated once (as a launcher would), handed over as JSON: the pool builds from the plan.
    plan = validate_scoring_config(
        cfg, student_checkpoint=checkpoints["student"], student_layout=ParallelLayout(pp=2), world_size=world_size
    )
    plan = ScoringPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    pool = ScoringPool(cfg, student_checkpoint=checkpoints["student"], student_layout=ParallelLayout(pp=2), plan=plan)
    # Ranks of one student pipeline (same data-parallel shard) pass identical requests.
    shard = rank % 2
    requests = _requests(shard, 4, ["math"], seed=3)
    scores = pool.score([ScoreRequest(**r) for r in requests])
    topk_scores = pool.score([ScoreRequest(**r) for r in requests], topk=TINY_VOCAB_SIZE)  # the whole vocabulary
    redistributed = {name: s.redistributed for name, s in pool.stats.items()}
    packed_stats = {name: dict(vars(s)) for name, s in pool.stats.items()}
    pool.close()
    # The same pool with right-padded micro-batches (packing=off): the same numbers.
    padded_plan = validate_scoring_config(
        cfg,
        student_checkpoint=checkpoints["student"],
        student_layout=ParallelLayout(pp=2),
        world_size=world_size,
        packing="off",
    )
    pool = ScoringPool(
        cfg, student_checkpoint=checkpoints["student"], student_layout=ParallelLayout(pp=2), plan=padded_plan
    )
    padded_topk = pool.score([ScoreRequest(**r) for r in requests], topk=8)
    packed_topk = topk_scores
    packed_vs_padded = max(
        max(
            (a.teacher_logprobs - b.teacher_logprobs).abs().max().item(),
            (a.ref_logprobs - b.ref_logprobs).abs().max().item(),
            (a.teacher_topk_logprobs[:, :8] - b.teacher_topk_logprobs).abs().max().item(),
            (a.ref_topk_logprobs[:, :8] - b.ref_topk_logprobs).abs().max().item(),
        )
        for a, b in zip(packed_topk, padded_topk)
    )
    padded_stats = {name: dict(vars(s)) for name, s in pool.stats.items()}
    # Rank 2 holds shard 0 like rank 0 but passes another list: refused on every rank.
    try:
        pool.score([ScoreRequest(**r) for r in requests[: 3 if rank == 2 else 4]])
        mismatch_error = "no error"
    except ValueError as err:
        mismatch_error = str(err)
    pool.close()
    # The standalone models run at TP=1/PP=1 on every rank.
    platform.init_model_parallel(tp=1, pp=1)
    standalone = _Standalone(checkpoints, ["student", "math"])
    renderers = {name: (lambda r: r["prompt_ids"]) for name in checkpoints}
    rows = _check_scores(scores, requests, {"math": ("math", 1.5, "student")}, standalone, renderers)
    rows += _check_scores(
        topk_scores, requests, {"math": ("math", 1.5, "student")}, standalone, renderers, topk=TINY_VOCAB_SIZE
    )
    return {
        "rows": rows,
        "redistributed": redistributed,
        "mismatch_error": mismatch_error,
        "plans_packed": ([m.packed for m in plan.models], [m.packed for m in padded_plan.models]),
        "packed_vs_padded": packed_vs_padded,
        "stats": (packed_stats, padded_stats),
    }


def _bad_setup_body(rank: int, world_size: int, checkpoints: dict[str, str]) -> dict:
    """Each broken setup fails on every rank, before any process group or model is created."""
    from megatron_gopd import platform
    from megatron_gopd.models import ParallelLayout
    from megatron_gopd.scoring import ScoringPool

    platform.init_model_parallel(tp=1, pp=1)
    counts, restore = _count_groups()

    def teacher(ckpt: str, **sizes: int) -> ScoringConfig:
        return ScoringConfig(teachers={"math": TeacherConfig(model=PoolModelConfig(ckpt, **sizes), domains=["math"])})

    cases = {
        "missing": teacher(checkpoints["missing"]),
        "not_converted": teacher(checkpoints["not_converted"]),
        "bad_vocab": teacher(checkpoints["bad_vocab"]),
        "bad_vocab_size": teacher(checkpoints["bad_vocab_size"]),
        "tp3": teacher(checkpoints["math"], tp=3),
        "tp4": teacher(checkpoints["math"], tp=4),
        "pp3": teacher(checkpoints["math"], tp=1, pp=3),
        "ep3": teacher(checkpoints["moe"], ep=3),
        "no_teachers": ScoringConfig(),
    }
    errors = {}
    for name, cfg in cases.items():
        try:
            ScoringPool(cfg, student_checkpoint=checkpoints["student"], student_layout=ParallelLayout())
            errors[name] = "no error"
        except ScoringConfigError as err:
            errors[name] = str(err)
    try:
        ScoringPool(
            teacher(checkpoints["math"]), student_checkpoint=checkpoints["student"], student_layout=ParallelLayout(tp=2)
        )  # not what parallel_state says
        errors["student_layout"] = "no error"
    except ValueError as err:
        errors["student_layout"] = str(err)
    other_job = validate_scoring_config(
        teacher(checkpoints["math"]),
        student_checkpoint=checkpoints["student"],
        student_layout=ParallelLayout(),
        world_size=2,
    )
    try:
        ScoringPool(
            teacher(checkpoints["math"]),
            student_checkpoint=checkpoints["student"],
            student_layout=ParallelLayout(),
            plan=other_job,
        )
        errors["plan_for_other_job"] = "no error"
    except ValueError as err:
        errors["plan_for_other_job"] = str(err)
    restore()
    return {"errors": errors, "groups_created": counts["created"]}


# ----------------------------------------------------------------------------------------------
# Tests


@pytest.mark.slow
def test_pool_scores_match_standalone_models_and_route_by_domain(checkpoints):
    reports = run_distributed(_pool_body, world_size=4, timeout=240, checkpoints=checkpoints)
    rows = [row for report in reports for row in report["rows"]]
    expected_teacher = {
        "math": "math",
        "code": "code",
        "physics": "physics",
        "chemistry": "physics",
        "chat": "chat",
        "moe": "moe",
        "moe_sp": "moe_sp",
    }
    expected_lam = {"math": 1.25, "code": 0.5, "physics": 2.0, "chemistry": 2.0, "chat": 1.0, "moe": 0.8, "moe_sp": 1.0}
    assert {row["domain"] for row in rows} == set(expected_teacher)
    for row in rows:
        assert row["teacher"] == expected_teacher[row["domain"]], row
        assert row["lam"] == expected_lam[row["domain"]], row
        assert row["teacher_shape"] == (row["n"],) and row["dtype"] == "torch.float32", row
        # TP=2/PP=2, PP=2, TP=2, EP=2 and TP=1 teachers all equal the model alone at TP=1.
        assert row["teacher_diff"] < TOL, row
        if row["lam"] == 1.0:  # the reference drops out and is not run
            assert row["ref_none"], row
        else:  # reward correction (math_base) or the student's initial weights
            assert not row["ref_none"] and row["ref_diff"] < TOL, row
            assert row["teacher_vs_ref"] > 1e-2, row  # the comparison can tell the models apart
        if row["topk"]:  # top-k through every layout: ids, values and the reference at those ids
            assert row["topk_shape"] == (row["n"], 5) and row["topk_ids_dtype"] == "torch.int64", row
            assert row["topk_value_diff"] < TOL and row["topk_id_diff"] < TOL, row
            assert row["ref_topk_none"] == row["ref_none"], row
            if not row["ref_none"]:
                assert row["ref_topk_diff"] < TOL, row
        else:
            assert row["topk_none"], row
    assert {row["domain"] for row in rows if row["topk"]} == set(expected_teacher)

    # Each model ran exactly the sequences routed to it: sum over its distinct replicas.
    stats = [report["stats"] for report in reports]
    assert set(stats[0]) == {"math", "code", "physics", "chat", "moe", "moe_sp", "math_base", STUDENT_INIT}
    for model, domains, key in [
        ("math", {"math"}, "tokens"),
        ("code", {"code"}, "tokens"),
        ("physics", {"physics", "chemistry"}, "tokens"),
        ("chat", {"chat"}, "tokens"),
        ("moe", {"moe"}, "tokens"),
        ("moe_sp", {"moe_sp"}, "tokens"),
        ("math_base", {"math", "physics", "chemistry"}, "ref_tokens"),
        (STUDENT_INIT, {"code", "moe"}, "ref_tokens"),
    ]:
        replicas = {s[model]["replica"]: s[model] for s in stats}
        assert len(replicas) == stats[0][model]["num_replicas"], model
        mine = [row for row in rows if row["domain"] in domains]
        assert sum(r["sequences"] for r in replicas.values()) == len(mine), model
        assert sum(r["tokens"] for r in replicas.values()) == sum(row[key] for row in mine), model
        assert all(r["padded_tokens"] >= r["tokens"] for r in replicas.values()), model
    assert {s["math"]["num_replicas"] for s in stats} == {1}  # TP=2 x PP=2 on 4 ranks
    math = stats[0]["math"]  # several micro-batches, some holding several (right-padded) sequences
    assert 1 < math["micro_batches"] < math["sequences"] and math["padded_tokens"] > math["tokens"], math
    assert {s["code"]["num_replicas"] for s in stats} == {4}  # the student's layout
    assert [name for name, s in stats[0].items() if not s["redistributed"]] == ["code", "moe", STUDENT_INIT]

    for report in reports:
        # One build per distinct (checkpoint, layout, dtype): math_base is shared by two teachers as
        # their reference, and its weights at TP=2 are those the "chat" teacher already loaded.
        assert report["model_loads"] == ["math", "code", "physics", "chat", "moe", "moe_sp", STUDENT_INIT]
        assert report["teacher_for"] == expected_teacher
        assert "no teacher scores domain 'poetry'" in report["teacher_for_error"]
        assert "poetry" in report["score_error"], report["score_error"]
        assert "topk must be in [0, " in report["topk_error"], report["topk_error"]
        # every process group the pool created was destroyed by close()
        assert report["groups"]["created"] > 0
        assert report["groups"]["created"] == report["groups"]["destroyed"], report["groups"]


@pytest.mark.slow
def test_pool_beside_pipelined_student_needs_no_redistribution(checkpoints):
    reports = run_distributed(_pipeline_student_body, world_size=4, timeout=240, checkpoints=checkpoints)
    for rank, report in enumerate(reports):
        assert report["redistributed"] == {"math": False, STUDENT_INIT: False}, rank
        assert "rank 2 passed other requests than rank 0" in report["mismatch_error"], report
        # packing=auto packs both models; packed and right-padded micro-batches score alike
        assert report["plans_packed"] == ([True, True], [False, False]), report["plans_packed"]
        assert report["packed_vs_padded"] < TOL, report["packed_vs_padded"]
        packed, padded = (stats["math"] for stats in report["stats"])
        assert packed["tokens"] == packed["padded_tokens"], report["stats"]  # TP=1: no rounding
        assert padded["padded_tokens"] >= padded["tokens"] > 0, report["stats"]
        assert len(report["rows"]) == 8
        for row in report["rows"]:
            assert row["teacher_diff"] < TOL and row["ref_diff"] < TOL, (rank, row)
            if row["topk"]:  # k = the whole vocabulary, broadcast from the last pipeline stage
                assert row["topk_value_diff"] < TOL and row["topk_id_diff"] < TOL, (rank, row)
                assert row["ref_topk_diff"] < TOL, (rank, row)


@pytest.mark.slow
def test_bad_setups_fail_before_anything_is_built(checkpoints):
    reports = run_distributed(_bad_setup_body, world_size=4, timeout=240, checkpoints=checkpoints)
    expected = {
        "missing": "does_not_exist does not exist",
        "not_converted": "is not a megatron-gopd checkpoint",
        "bad_vocab": "have different tokenizers (131 vs 130 tokens; e.g. '<extra>' is id None in the student",
        "bad_vocab_size": f"has vocab_size {TINY_VOCAB_SIZE + 2} in hf/config.json but the student",
        "tp3": "tp x pp = 3 x 1 = 3 does not divide the world size 4",
        "tp4": "num_key_value_heads=2 is not divisible by tensor_parallel=4",
        "pp3": "does not divide the world size 4",
        "ep3": "ep x expert tp = 3 x 1 does not divide world / pp = 4",
        "no_teachers": "no teachers",
        "student_layout": "does not match Megatron's parallel state",
        "plan_for_other_job": "was made for student",
    }
    for rank, report in enumerate(reports):
        for case, message in expected.items():
            assert message in report["errors"][case], (rank, case, report["errors"][case])
        assert "teacher 'math'" in report["errors"]["bad_vocab"]  # names both models
        assert checkpoints["student"] in report["errors"]["bad_vocab"]
        assert report["groups_created"] == 0, rank


# ----------------------------------------------------------------------------------------------
# Config checks (no files, no ranks)


@pytest.mark.parametrize("lam", [0.0, -1.0, math.nan, math.inf])
def test_lam_must_be_positive_and_finite(lam):
    with pytest.raises(ValueError, match="lam must be a finite number > 0"):
        TeacherConfig(domains=["math"], lam=lam)


def test_reference_none_only_with_plain_opd():
    with pytest.raises(ValueError, match="reference: null is allowed only with lam == 1"):
        TeacherConfig(domains=["math"], lam=1.25, reference=None)
    assert TeacherConfig(domains=["math"], lam=1.0, reference=None).scored_reference is None
    # lam == 1: the reference drops out of the advantage and is not run
    assert TeacherConfig(domains=["math"], lam=1.0).scored_reference is None
    assert TeacherConfig(domains=["math"], lam=1.25).scored_reference == STUDENT_INIT


def test_scoring_config_lists_every_problem():
    with pytest.raises(ScoringConfigError) as err:
        ScoringConfig(
            teachers={
                "math": TeacherConfig(domains=["math", "algebra"], lam=1.25, reference="math_base"),
                "algebra": TeacherConfig(domains=["algebra"]),
                "empty": TeacherConfig(domains=[]),
                "student_init": TeacherConfig(domains=["x"]),
            },
            references={"student_init": PoolModelConfig("x"), "empty": PoolModelConfig("y")},
            micro_batch_tokens=0,
        )
    message = str(err.value)
    for expected in [
        "reference 'math_base' is not defined; known: ['empty', 'student_init']",
        "domain 'algebra' is claimed by teachers 'math' and 'algebra'",
        "teacher 'empty' has no domains",
        "references may not be named 'student_init'",
        "teachers may not be named 'student_init'",
        "'empty' names both a teacher and a reference",
        "micro_batch_tokens must be >= 1",
    ]:
        assert expected in message, message


def test_scoring_config_from_yaml_dict():
    cfg = from_dict(
        ScoringConfig,
        {
            "teachers": {
                "math": {
                    "model": {"checkpoint": "/ckpt/math", "tp": 2, "pp": 2},
                    "domains": ["math"],
                    "lam": 1.25,
                    "reference": "math_base",
                }
            },
            "references": {"math_base": {"checkpoint": "/ckpt/base", "tp": 2}},
        },
    )
    assert cfg.teachers["math"].model.layout.tp == 2 and cfg.references["math_base"].tp == 2
    assert cfg.routing() == {"math": "math"}
    with pytest.raises(ConfigError, match="lam must be a finite number > 0"):
        from_dict(ScoringConfig, {"teachers": {"math": {"domains": ["math"], "lam": 0}}})
    with pytest.raises(ConfigError, match="tp must be >= 1"):
        from_dict(ScoringConfig, {"references": {"base": {"checkpoint": "x", "tp": 0}}})


@pytest.mark.slow
def test_validation_reports_every_problem_at_once(checkpoints):
    from megatron_gopd.models import ParallelLayout

    cfg = ScoringConfig(
        teachers={
            "math": TeacherConfig(model=PoolModelConfig(checkpoints["bad_vocab"], tp=3), domains=["math"]),
            "code": TeacherConfig(model=PoolModelConfig(checkpoints["missing"]), domains=["code"]),
        }
    )
    with pytest.raises(ScoringConfigError) as err:
        validate_scoring_config(
            cfg, student_checkpoint=checkpoints["student"], student_layout=ParallelLayout(), world_size=4
        )
    assert "3 problem(s)" in str(err.value), str(err.value)
    plan = validate_scoring_config(
        ScoringConfig(
            teachers={"code": TeacherConfig(model=PoolModelConfig(checkpoints["code"]), domains=["code"], lam=1.1)}
        ),
        student_checkpoint=checkpoints["student"],
        student_layout=ParallelLayout(),
        world_size=4,
    )
    # the code teacher's chat template differs from the student's: it renders prompts itself
    assert [(p.name, p.rerender) for p in plan.models] == [("code", True), (STUDENT_INIT, False)]
    assert plan.models[0].tokenizer_dir == str(Path(checkpoints["code"]) / "hf")
    # The plan is plain data: the launcher can validate once and hand it to the ranks as JSON.
    assert ScoringPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    # ... but only to a pool for the same job and config.
    with pytest.raises(ValueError, match="was made for student"):
        plan.check_matches(
            cfg, student_checkpoint=checkpoints["student"], student_layout=ParallelLayout(), world_size=2
        )
    with pytest.raises(ValueError, match="does not describe this scoring config"):
        plan.check_matches(
            cfg, student_checkpoint=checkpoints["student"], student_layout=ParallelLayout(), world_size=4
        )


@pytest.mark.slow
def test_packing_on_is_refused_for_a_model_with_local_attention(checkpoints):
    """packing=on with a teacher that cannot take packed sequences: refused by validation (nothing
    built), naming the teacher and its setting; packing=auto runs that one model right-padded."""
    from megatron_gopd.models import ParallelLayout

    cfg = ScoringConfig(
        teachers={
            "math": TeacherConfig(
                model=PoolModelConfig(checkpoints["math"], attention="local"), domains=["math"], lam=1.5
            )
        }
    )
    where = dict(student_checkpoint=checkpoints["student"], student_layout=ParallelLayout(), world_size=4)
    with pytest.raises(ScoringConfigError) as err:
        validate_scoring_config(cfg, packing="on", **where)
    message = str(err.value)
    assert "packing=on" in message and "scoring.teachers.math.model.attention" in message, message
    assert "attention='local'" in message and checkpoints["math"] in message, message
    plan = validate_scoring_config(cfg, packing="auto", **where)
    assert [(m.name, m.attention, m.packed) for m in plan.models] == [
        ("math", "local", False),
        (STUDENT_INIT, "auto", True),
    ]
    with pytest.raises(ValueError, match="attention must be 'auto', 'sdpa' or 'local'"):
        PoolModelConfig("x", attention="flash")
