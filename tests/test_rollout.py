"""The Megatron-native rollout engine against `transformers` and against full-sequence forwards.

One launch of 2 gloo ranks runs every multi-process check, on three layouts of the same tiny Qwen3
(a random `transformers` model, its LM head scaled up so that greedy decoding has no near-ties,
saved with ``save_pretrained`` and loaded with `load_hf_weights`): TP=1 (2 data-parallel replicas),
TP=2 and PP=2 (with the prefill cut into pipeline micro-batches). The test functions below read the
results of that launch. Checks that need no model (parameter validation, the sampling functions)
run in the test process itself.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from megatron_gopd.rollout import (
    RolloutBatch,
    RolloutSample,
    SamplingParams,
    sample_from_logits,
    truncation_mask,
    validate_request,
)
from tests.dist_harness import run_distributed

VOCAB = 300
MAX_POSITIONS = 64
HF_CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=MAX_POSITIONS,
    tie_word_embeddings=False,
)
LM_HEAD_SCALE = 10.0  # logits spread of ~1.5 nats: no greedy near-ties, yet diverse samples
PROMPT_LENGTHS = (5, 11, 3, 8)  # different lengths on purpose: prompt tails are fed step by step
GREEDY_NEW_TOKENS = 16

SAMPLED = {  # name -> sampling parameters, run on every layout
    "t1": SamplingParams(temperature=1.0, max_new_tokens=12, n=3, seed=7),
    "topk_topp": SamplingParams(temperature=0.7, top_k=20, top_p=0.8, max_new_tokens=10, n=2, seed=11),
    "topk": SamplingParams(temperature=1.3, top_k=5, max_new_tokens=10, seed=5),
}
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}  # name -> (tp, pp)


# ----------------------------------------------------------------------------------------------
# The model and the references (test process)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> tuple[Path, Any]:
    """A tiny random Qwen3 with a sharpened LM head, saved as safetensors; (dir, model)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**HF_CONFIG)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
    hf_dir = tmp_path_factory.mktemp("rollout") / "hf_qwen3"
    model.save_pretrained(hf_dir)
    return hf_dir, model


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def hf_greedy(hf_model, prompts) -> list[list[int]]:
    """`transformers` greedy continuations, one unpadded prompt at a time (no EOS: full length)."""
    _, model = hf_model
    outputs = []
    for prompt in prompts:
        with torch.no_grad():
            full = model.generate(
                torch.tensor([prompt]),
                do_sample=False,
                max_new_tokens=GREEDY_NEW_TOKENS,
                eos_token_id=None,
                pad_token_id=0,
            )
        outputs.append(full[0, len(prompt) :].tolist())
    return outputs


@pytest.fixture(scope="module")
def dist_results(hf_model, prompts, hf_greedy) -> list[dict]:
    """Every multi-process check, in one launch of 2 ranks; one result dict per rank."""
    hf_dir, _ = hf_model
    return run_distributed(
        _rollout_body, world_size=2, timeout=600.0, hf_dir=str(hf_dir), prompts=prompts, hf_greedy=hf_greedy
    )


# ----------------------------------------------------------------------------------------------
# What every rank runs


def _batch_dict(batch: RolloutBatch) -> list[dict]:
    return [
        dict(
            prompt_index=s.prompt_index,
            sample_index=s.sample_index,
            token_ids=s.token_ids,
            sampler_logprobs=s.sampler_logprobs,
            logprobs=s.logprobs,
            finish_reason=s.finish_reason,
        )
        for s in batch
    ]


def _check_against_full_forward(
    model, vocab_size: int, prompts: list[list[int]], samples: list[dict], sampling: SamplingParams
) -> dict | None:
    """Score prompt + response with one ordinary (no KV cache) forward; compare the engine's numbers.

    Returns, on the last pipeline stage, the largest log-prob differences and the number of tokens
    outside the reference top-k / top-p set; None on other stages.
    """
    from megatron_gopd.rollout import truncation_mask
    from tests.megatron_utils import forward_logits

    sequences = [prompts[s["prompt_index"]] + s["token_ids"] for s in samples]
    width = max(map(len, sequences))
    # Right padding: with causal attention it cannot change the logits of earlier positions.
    tokens = torch.tensor([seq + [0] * (width - len(seq)) for seq in sequences])  # [N, s]
    logits, _ = forward_logits(model, tokens, vocab_size)  # [N, s, V] (last stage)
    if logits is None:
        return None
    worst = dict(logprobs=0.0, sampler_logprobs=0.0, outside_allowed=0, tokens=0)
    for row, sample in enumerate(samples):
        start, response = len(prompts[sample["prompt_index"]]), sample["token_ids"]
        ref = logits[row, start - 1 : start - 1 + len(response)].double()  # [L, V] predicts each response token
        targets = torch.tensor(response)[:, None]
        ref_logprobs = ref.log_softmax(-1).gather(1, targets).squeeze(1)
        engine_logprobs = torch.tensor(sample["logprobs"], dtype=torch.float64)
        worst["logprobs"] = max(worst["logprobs"], (ref_logprobs - engine_logprobs).abs().max().item())
        if sampling.greedy:
            ref_sampler = torch.zeros(len(response), dtype=torch.float64)
        else:
            scaled = ref / sampling.temperature
            allowed = truncation_mask(scaled, sampling.top_k, sampling.top_p)
            if allowed is not None:
                # Slack for top-p: a token right at the nucleus boundary may flip with ~1e-6 logit noise.
                loose = truncation_mask(scaled, sampling.top_k, min(1.0, sampling.top_p + 1e-4))
                worst["outside_allowed"] += int((~loose.gather(1, targets)).sum())
                scaled = scaled.masked_fill(~allowed, -math.inf)
            ref_sampler = scaled.log_softmax(-1).gather(1, targets).squeeze(1)
        worst["sampler_logprobs"] = max(
            worst["sampler_logprobs"],
            (ref_sampler - torch.tensor(sample["sampler_logprobs"], dtype=torch.float64)).abs().max().item(),
        )
        worst["tokens"] += len(response)
    return worst


def _expect_value_error(call) -> str:
    try:
        call()
    except ValueError as error:
        return str(error)
    return "<no error>"


def _single_layout_checks(model, arch, prompts: list[list[int]], engine, greedy: list[dict]) -> dict:
    """Finish reasons, batch independence, chunking, seeds and bad input, on one layout."""
    from megatron_gopd.rollout import MegatronRolloutEngine

    out: dict[str, Any] = {}
    greedy_params = SamplingParams(temperature=0.0, max_new_tokens=GREEDY_NEW_TOKENS)
    # EOS and stop tokens taken from the greedy output itself, so that they do occur: prompt 0's
    # token at step 4 becomes the EOS, prompt 1's token at step 7 a stop token.
    eos, stop = greedy[0]["token_ids"][4], greedy[1]["token_ids"][7]
    eos_engine = MegatronRolloutEngine(model, arch, eos_token_ids=[eos])
    out["eos_stop"] = dict(
        eos=eos,
        stop=stop,
        batch=_batch_dict(eos_engine.generate(prompts, dataclasses.replace(greedy_params, stop_token_ids=(stop,)))),
    )
    # The context ends 3 tokens after this prompt: finish reason "length" after 3 tokens.
    long_prompt = (prompts[0] * MAX_POSITIONS)[: MAX_POSITIONS - 3]
    out["context_limit"] = _batch_dict(engine.generate([long_prompt], greedy_params))

    base = SAMPLED["t1"]
    out["t1_again"] = _batch_dict(engine.generate(prompts, base))
    out["t1_other_seed"] = _batch_dict(engine.generate(prompts, dataclasses.replace(base, seed=8)))
    # Prompt 0 in another batch (other prompts, other lengths): its samples must not change.
    out["t1_other_batch"] = _batch_dict(engine.generate([prompts[0], prompts[2][:2], prompts[1]], base))
    # Several KV-cache batches, and the sampling rank sampling a few rows at a time: same samples.
    from megatron_gopd.rollout import megatron_engine

    chunked = MegatronRolloutEngine(model, arch, max_batch_size=4)
    sampling_rows, megatron_engine._SAMPLING_ROWS = megatron_engine._SAMPLING_ROWS, 3
    try:
        out["t1_chunked"] = _batch_dict(chunked.generate(prompts, base))
    finally:
        megatron_engine._SAMPLING_ROWS = sampling_rows
    out["no_logprobs"] = _batch_dict(engine.generate(prompts[:1], dataclasses.replace(base, return_logprobs=False)))

    out["errors"] = {
        "empty prompt": _expect_value_error(lambda: engine.generate([prompts[0], []], base)),
        "too long": _expect_value_error(lambda: engine.generate([[1] * MAX_POSITIONS], base)),
        "token outside vocab": _expect_value_error(lambda: engine.generate([[1, VOCAB]], base)),
        "stop outside vocab": _expect_value_error(
            lambda: engine.generate(prompts, dataclasses.replace(base, stop_token_ids=(VOCAB + 5,)))
        ),
    }
    return out


def _rollout_body(
    rank: int, world_size: int, hf_dir: str, prompts: list[list[int]], hf_greedy: list[list[int]]
) -> dict:
    from megatron.core import parallel_state

    from megatron_gopd import platform
    from megatron_gopd.bridge import load_hf_weights
    from megatron_gopd.models import ModelArchitecture, ParallelLayout, build_gpt_model
    from megatron_gopd.rollout import MegatronRolloutEngine

    arch = ModelArchitecture.from_pretrained(hf_dir)
    results: dict[str, Any] = {}
    for name, (tp, pp) in LAYOUTS.items():
        platform.init_model_parallel(tp=tp, pp=pp)
        model = build_gpt_model(arch, ParallelLayout(tp=tp, pp=pp), perform_initialization=False)
        load_hf_weights(model, arch, hf_dir)
        # PP: prefills of more than 8 tokens go through the stages in micro-batches.
        engine = MegatronRolloutEngine(model, arch, pipeline_microbatch_tokens=8 if pp > 1 else None)
        phase: dict[str, Any] = {"last_stage": parallel_state.is_pipeline_last_stage()}
        runs = {"greedy": SamplingParams(temperature=0.0, max_new_tokens=GREEDY_NEW_TOKENS), **SAMPLED}
        phase["forward_check"] = {}
        for run_name, sampling in runs.items():
            phase[run_name] = _batch_dict(engine.generate(prompts, sampling))
            phase["forward_check"][run_name] = _check_against_full_forward(
                model, arch.vocab_size, prompts, phase[run_name], sampling
            )
        if name == "tp1":
            phase.update(_single_layout_checks(model, arch, prompts, engine, phase["greedy"]))
        if name == "tp2":
            # Ranks of one replica given different prompts must fail, not hang or mix samples.
            try:
                engine.generate([prompts[rank]], SAMPLED["t1"])
                phase["mismatch"] = "<no error>"
            except RuntimeError as error:
                phase["mismatch"] = str(error)
        results[name] = phase
    return results


# ----------------------------------------------------------------------------------------------
# Multi-process checks


def _first_divergence(got: list[int], want: list[int]) -> str:
    for step, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return f"step {step}: engine {a} vs reference {b} (engine {got}, reference {want})"
    return f"lengths {len(got)} vs {len(want)}"


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_greedy_equals_transformers_generate(dist_results, hf_greedy, layout):
    for rank, result in enumerate(dist_results):
        for index, (sample, want) in enumerate(zip(result[layout]["greedy"], hf_greedy)):
            assert sample["token_ids"] == want, (
                f"{layout} rank {rank} prompt {index}: first divergence at "
                f"{_first_divergence(sample['token_ids'], want)}"
            )
            assert sample["finish_reason"] == "length"


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logprobs_equal_full_forward_and_stay_in_allowed_set(dist_results, layout):
    checks = [r[layout]["forward_check"] for r in dist_results if r[layout]["last_stage"]]
    assert checks
    for per_run in checks:
        for run_name, worst in per_run.items():
            assert worst["tokens"] > 0
            assert worst["logprobs"] < 1e-5, (layout, run_name, worst)
            assert worst["sampler_logprobs"] < 1e-5, (layout, run_name, worst)
            assert worst["outside_allowed"] == 0, (layout, run_name, worst)


@pytest.mark.slow
def test_all_ranks_and_layouts_sample_the_same_tokens(dist_results):
    reference = dist_results[0]["tp1"]
    for rank, result in enumerate(dist_results):
        for layout in LAYOUTS:
            for run_name in ("greedy", *SAMPLED):
                got = result[layout][run_name]
                assert [s["token_ids"] for s in got] == [s["token_ids"] for s in reference[run_name]], (
                    f"{run_name}: rank {rank} {layout} differs from rank 0 tp1"
                )
                assert [s["finish_reason"] for s in got] == [s["finish_reason"] for s in reference[run_name]]
                # Every rank of a replica receives the sampling rank's log-probs.
                for mine, ref in zip(got, reference[run_name]):
                    assert max(abs(a - b) for a, b in zip(mine["logprobs"], ref["logprobs"])) < 1e-5


@pytest.mark.slow
def test_samples_are_distinct_seeded_and_independent_of_the_batch(dist_results):
    tp1 = dist_results[0]["tp1"]
    t1 = tp1["t1"]
    n = SAMPLED["t1"].n
    assert [(s["prompt_index"], s["sample_index"]) for s in t1] == [
        (p, j) for p in range(len(PROMPT_LENGTHS)) for j in range(n)
    ]
    for prompt_index in range(len(PROMPT_LENGTHS)):
        responses = {tuple(s["token_ids"]) for s in t1 if s["prompt_index"] == prompt_index}
        assert len(responses) == n, f"prompt {prompt_index}: n={n} samples are not all distinct"
    assert tp1["t1_again"] == t1, "same seed, prompts and weights must give the same batch"
    assert [s["token_ids"] for s in tp1["t1_other_seed"]] != [s["token_ids"] for s in t1]
    assert [s["token_ids"] for s in tp1["t1_other_batch"][:n]] == [s["token_ids"] for s in t1[:n]]
    assert [s["token_ids"] for s in tp1["t1_chunked"]] == [s["token_ids"] for s in t1]
    assert all(s["logprobs"] is None for s in tp1["no_logprobs"])
    # At temperature 1 with no truncation the sampler's distribution is the model's.
    for sample in t1:
        assert max(abs(a - b) for a, b in zip(sample["sampler_logprobs"], sample["logprobs"])) < 1e-6


@pytest.mark.slow
def test_eos_stop_and_length_end_samples(dist_results):
    tp1 = dist_results[0]["tp1"]
    greedy, eos_stop = tp1["greedy"], tp1["eos_stop"]
    eos, stop = eos_stop["eos"], eos_stop["stop"]
    reasons = []
    for sample, full in zip(eos_stop["batch"], greedy):
        expected, reason = full["token_ids"], "length"
        for step, token in enumerate(full["token_ids"]):
            if token in (eos, stop):
                expected, reason = full["token_ids"][: step + 1], "eos" if token == eos else "stop"
                break
        assert sample["token_ids"] == expected, _first_divergence(sample["token_ids"], expected)
        assert sample["finish_reason"] == reason
        assert len(sample["logprobs"]) == len(sample["sampler_logprobs"]) == len(expected)
        reasons.append(reason)
    # Samples ended at different steps, so the batch was compacted while others went on.
    assert "eos" in reasons and "stop" in reasons
    [limited] = tp1["context_limit"]
    assert len(limited["token_ids"]) == 3 and limited["finish_reason"] == "length"


@pytest.mark.slow
def test_bad_input_fails_before_generation(dist_results):
    errors = dist_results[0]["tp1"]["errors"]
    assert "prompt 1 is empty" in errors["empty prompt"]
    assert f"context is {MAX_POSITIONS} tokens" in errors["too long"]
    assert "outside [0, 300)" in errors["token outside vocab"]
    assert "stop_token_ids" in errors["stop outside vocab"]
    for rank_result in dist_results:
        assert "different prompts" in rank_result["tp2"]["mismatch"]


# ----------------------------------------------------------------------------------------------
# Single-process checks


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(n=0), "n"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(stop_token_ids=(3, -1)), "stop_token_ids"),
        (dict(seed=-1), "seed"),
        (dict(temperature=math.nan), "temperature"),
    ],
)
def test_sampling_params_reject_bad_values(changes, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**changes)


def test_validate_request_messages():
    sampling = SamplingParams()
    check = dict(max_sequence_length=10, vocab_size=50)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        validate_request([[]], sampling, **check)
    with pytest.raises(ValueError, match="prompt 1 has 10 tokens but the context is 10"):
        validate_request([[1], [1] * 10], sampling, **check)
    with pytest.raises(ValueError, match="eos_token_ids"):
        validate_request([[1]], sampling, eos_token_ids=[50], **check)
    with pytest.raises(TypeError, match="list of token-id lists"):
        validate_request(torch.ones(2, 3, dtype=torch.long), sampling, **check)
    validate_request([[1, 2], (3, np.int64(4))], SamplingParams(stop_token_ids=[49]), **check)  # fine


def _brute_force_allowed(probs: list[float], top_k: int, top_p: float) -> set[int]:
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    if top_k:
        order = order[:top_k]
    total = sum(probs[i] for i in order)
    kept, mass = [], 0.0
    for i in order:
        if mass >= top_p:
            break
        kept.append(i)
        mass += probs[i] / total
    return set(kept)


@pytest.mark.parametrize("top_k, top_p", [(7, 1.0), (0, 0.6), (10, 0.5), (1, 0.9), (0, 1.0)])
def test_truncation_mask_matches_its_definition(top_k, top_p):
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(top_k), dtype=torch.float64) * 2
    allowed = truncation_mask(logits, top_k, top_p)
    if top_k == 0 and top_p == 1.0:
        assert allowed is None
        return
    for row in range(logits.shape[0]):
        expected = _brute_force_allowed(logits[row].softmax(-1).tolist(), top_k, top_p)
        assert set(allowed[row].nonzero().flatten().tolist()) == expected


def test_sampler_follows_the_truncated_distribution_and_skips_padding():
    vocab, padded, draws = 30, 64, 40000
    logits = torch.randn(1, padded, generator=torch.Generator().manual_seed(3))
    logits[:, vocab:] = 50.0  # Megatron's padded rows: must never be sampled, however large
    sampling = SamplingParams(temperature=0.8, top_k=12, top_p=0.9)
    uniforms = torch.rand(draws, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    result = sample_from_logits(logits.expand(draws, -1), vocab, sampling, uniforms)
    scaled = logits[:, :vocab] / sampling.temperature
    allowed = truncation_mask(scaled, sampling.top_k, sampling.top_p)[0]
    target = scaled.masked_fill(~allowed, -math.inf).softmax(-1)[0]
    assert bool(allowed[result.token_ids].all()) and int(result.token_ids.max()) < vocab
    frequencies = torch.bincount(result.token_ids, minlength=vocab).double() / draws
    assert (frequencies - target.double()).abs().max() < 0.01
    expected_sampler = target.log()[result.token_ids]
    assert torch.allclose(result.sampler_logprobs, expected_sampler, atol=1e-5)
    assert torch.allclose(result.logprobs, logits[0, :vocab].log_softmax(-1)[result.token_ids], atol=1e-5)
    greedy = sample_from_logits(logits, vocab, SamplingParams(temperature=0.0), torch.zeros(1, dtype=torch.float64))
    assert int(greedy.token_ids) == int(logits[0, :vocab].argmax()) and float(greedy.sampler_logprobs) == 0.0


def test_padded_batch_masks_by_length():
    batch = RolloutBatch(
        samples=[
            RolloutSample(0, 0, [5, 7, 1], [-0.1, -0.2, -0.3], [-1.0, -2.0, -3.0], "eos"),
            RolloutSample(1, 0, [1], [-0.5], [-0.7], "length"),
        ]
    )
    padded = batch.padded(pad_token_id=1)  # pad id equal to a real token: the mask must not use it
    assert padded["token_ids"].tolist() == [[5, 7, 1], [1, 1, 1]]
    assert padded["response_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert padded["logprobs"][1].tolist() == [-0.699999988079071, 0.0, 0.0]
    assert batch.truncation_rate == 0.5 and batch.num_tokens == 4
