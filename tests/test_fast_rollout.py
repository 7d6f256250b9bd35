"""The fast rollout engine against the Megatron engine (the reference) and against full forwards.

One launch of 2 gloo ranks runs every multi-process check on the sharpened tiny Qwen3 of
`test_rollout` (loaded from its safetensors): TP=1 on rank 0 (the other rank idles), then TP=2 on
both, then PP=2 (which the fast engine refuses). A random tiny Llama (tied embeddings, Llama-3 RoPE
scaling, no q/k norm) checks the forward itself. Checks that need no model (slot bookkeeping, KV
budgets, attention kernels, support reasons) run in the test process.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest
import torch

from megatron_gopd.rollout import SamplingParams, fast_engine_unsupported_reason
from megatron_gopd.rollout.fast_attention import (
    grouped_decode_attention,
    packed_prefill_attention,
    reference_decode_attention,
    reference_prefill_attention,
)
from megatron_gopd.rollout.kv_slots import KVSlotShape, SlotAllocator, slots_for_budget
from tests.dist_harness import run_distributed
from tests.megatron_utils import TINY_QWEN3, TINY_QWEN3_MOE, tiny_arch

# The tiny sharpened Qwen3 and the prompts are test_rollout's own fixtures (same model, same prompts).
from tests.test_rollout import (
    GREEDY_NEW_TOKENS,
    MAX_POSITIONS,
    SAMPLED,
    _batch_dict,
    _expect_value_error,
    hf_model,  # noqa: F401 - fixture
    prompts,  # noqa: F401 - fixture
)

TINY_LLAMA = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    vocab_size=300,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    rope_theta=5e5,
    tie_word_embeddings=True,
    rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    ),
)
SLOT_COUNTS = (1, 3, 8)


# ----------------------------------------------------------------------------------------------
# The launch (test process)


@pytest.fixture(scope="module")
def dist_results(hf_model, prompts) -> list[dict]:
    """Every multi-process check, in one launch of 2 ranks; one result dict per rank."""
    hf_dir, _ = hf_model
    return run_distributed(_fast_body, world_size=2, timeout=600.0, hf_dir=str(hf_dir), prompts=prompts)


# ----------------------------------------------------------------------------------------------
# What the ranks run


def _compare(reference: list[dict], fast: list[dict]) -> dict:
    """Token / finish-reason mismatches and the largest log-prob differences of two batches."""
    out = dict(
        mismatches=[],
        logprobs=0.0,
        sampler_logprobs=0.0,
        samples=len(fast),
        reasons=sorted({s["finish_reason"] for s in fast}),
    )
    if len(reference) != len(fast):
        out["mismatches"].append(f"{len(fast)} samples vs {len(reference)}")
    for index, (want, got) in enumerate(zip(reference, fast)):
        for field in ("prompt_index", "sample_index", "token_ids", "finish_reason"):
            if want[field] != got[field]:
                out["mismatches"].append(f"sample {index} {field}: fast {got[field]} vs reference {want[field]}")
        for field in ("logprobs", "sampler_logprobs"):
            if want[field] is None or got[field] is None:
                if (want[field] is None) != (got[field] is None):
                    out["mismatches"].append(f"sample {index}: {field} present on one side only")
                continue
            if len(want[field]) == len(got[field]):
                gap = max((abs(a - b) for a, b in zip(want[field], got[field])), default=0.0)
                out[field] = max(out[field], gap)
    return out


def _runs(greedy_eos_stop: tuple[int, int] | None = None) -> dict[str, SamplingParams]:
    runs = {"greedy": SamplingParams(temperature=0.0, max_new_tokens=GREEDY_NEW_TOKENS), **SAMPLED}
    if greedy_eos_stop is not None:
        runs["greedy_stop"] = dataclasses.replace(runs["greedy"], stop_token_ids=(greedy_eos_stop[1],))
        runs["t1_stop"] = dataclasses.replace(SAMPLED["t1"], stop_token_ids=(greedy_eos_stop[1],))
        runs["t1_no_logprobs"] = dataclasses.replace(SAMPLED["t1"], return_logprobs=False)
    return runs


def _against_reference(model, arch, prompts: list[list[int]], eos: tuple[int, ...], runs: dict, **fast_options) -> dict:
    """Generate every run with both engines; compare them."""
    from megatron_gopd.rollout import FastRolloutEngine, MegatronRolloutEngine

    reference = MegatronRolloutEngine(model, arch, eos_token_ids=eos)
    fast = FastRolloutEngine(model, arch, eos_token_ids=eos, **fast_options)
    return {
        name: _compare(
            _batch_dict(reference.generate(prompts, sampling)), _batch_dict(fast.generate(prompts, sampling))
        )
        for name, sampling in runs.items()
    }


def _megatron_rotated_keys(model, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's keys after RoPE ``[s, groups, d]`` in a full forward, by Megatron's own functions."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    captured: list[torch.Tensor] = []

    def hook(attention, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)  # [s, 1, H] after the input norm
        _, key, _ = attention.get_query_key_value_tensors(hidden, None)  # [s, 1, groups, d]
        freqs = model.rotary_pos_emb(hidden.shape[0])  # [s, 1, 1, d]
        captured.append(apply_rotary_pos_emb(key, freqs, config=attention.config)[:, 0])

    handles = [layer.self_attention.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.decoder.layers]
    try:
        with torch.no_grad():
            model(tokens[None, :], torch.arange(tokens.numel())[None, :], None)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _forward_equivalence(model, arch, sequence: list[int], prefill_len: int) -> dict:
    """Prefill `prefill_len` tokens, decode the rest one at a time (slot 1 of 2); compare every
    position's logits and every cached key with Megatron's full forward."""
    from megatron_gopd.rollout.fast_model import decode_step, decoder_weights, prefill, rope_tables
    from megatron_gopd.rollout.kv_slots import KVSlots, KVSlotShape
    from tests.megatron_utils import forward_logits

    weights = decoder_weights(model)
    cache = KVSlots(
        KVSlotShape(arch.num_layers, weights.groups, weights.head_dim, torch.float32),
        2,
        len(sequence),
        torch.device("cpu"),
    )
    cos, sin = rope_tables(weights, len(sequence), torch.device("cpu"), torch.float32)
    tokens = torch.tensor(sequence)
    slot = 1
    with torch.no_grad():
        logits = [
            prefill(
                weights,
                cache,
                tokens[:prefill_len],
                torch.arange(prefill_len),
                [0, prefill_len],
                [slot],
                cos,
                sin,
                logit_rows=torch.arange(prefill_len),
            )
        ]  # [prefill_len, V_padded]
        for position in range(prefill_len, len(sequence)):
            # Batch of 2: row 0 (a free slot) decodes a dummy token, row 1 is the sample.
            step_tokens, step_positions = torch.tensor([0, sequence[position]]), torch.tensor([0, position])
            logits.append(
                decode_step(
                    weights,
                    cache.keys,
                    cache.values,
                    step_tokens,
                    step_positions,
                    len(sequence),
                    cos,
                    sin,
                    grouped_decode_attention,
                )[1:]
            )
    fast_logits = torch.cat(logits)[:, : arch.vocab_size]  # [s, V]
    reference, _ = forward_logits(model, tokens[None, :], arch.vocab_size)  # [1, s, V]
    keys = _megatron_rotated_keys(model, tokens)
    return dict(
        logits=(fast_logits - reference[0]).abs().max().item(),
        keys=max(
            (cache.keys[i][slot].transpose(0, 1) - keys[i]).abs().max().item()  # [s, G, d]
            for i in range(arch.num_layers)
        ),
        key_scale=keys[0].abs().max().item(),
    )


def _decode_step_checks(model, arch) -> dict:
    """The decode step traces whole (fullgraph) and writes only its own positions of the slots."""
    from megatron_gopd.rollout.fast_model import decode_step, decoder_weights, rope_tables
    from megatron_gopd.rollout.kv_slots import KVSlots, KVSlotShape

    weights = decoder_weights(model)
    cache = KVSlots(
        KVSlotShape(arch.num_layers, weights.groups, weights.head_dim, torch.float32), 4, 32, torch.device("cpu")
    )
    for buffer in cache.keys + cache.values:
        buffer.normal_()
    cos, sin = rope_tables(weights, 32, torch.device("cpu"), torch.float32)
    tokens, positions = torch.tensor([5, 6, 7]), torch.tensor([3, 17, 0])

    def step(step_tokens, step_positions):
        return decode_step(
            weights, cache.keys, cache.values, step_tokens, step_positions, 32, cos, sin, grouped_decode_attention
        )

    before = [b.clone() for b in cache.keys + cache.values]
    pointers = [b.data_ptr() for b in cache.keys + cache.values]
    with torch.no_grad():
        eager = step(tokens, positions)
        written = torch.zeros(4, 32, dtype=torch.bool)
        written[torch.arange(3), positions] = True
        # buffers are [slots, G, positions, d]: look at them as [slots, positions, G, d]
        after = [b.transpose(1, 2) for b in cache.keys + cache.values]
        before = [b.transpose(1, 2) for b in before]
        untouched = all(torch.equal(b[~written], a[~written]) for b, a in zip(after, before))
        changed = all(not torch.equal(b[written], a[written]) for b, a in zip(after, before))
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True, backend="eager")(tokens, positions)  # raises on a break
    return dict(
        untouched=untouched,
        changed=changed,
        same_buffers=pointers == [b.data_ptr() for b in cache.keys + cache.values],
        compiled_gap=(compiled - eager).abs().max().item(),
    )


def _in_place_checks(model, arch, prompts: list[list[int]]) -> dict:
    """The engine reads the parameters themselves: same storage, and an in-place change is seen."""
    from megatron_gopd.rollout import FastRolloutEngine

    engine = FastRolloutEngine(model, arch)
    read = [engine.weights.embedding, engine.weights.output, engine.weights.final_norm] + [
        getattr(layer, field.name)
        for layer in engine.weights.layers
        for field in dataclasses.fields(layer)
        if isinstance(getattr(layer, field.name), torch.Tensor)
    ]
    model_pointers = {p.data_ptr() for p in model.parameters()}
    sampling = SAMPLED["t1"]
    first = _batch_dict(engine.generate(prompts, sampling))
    embedding = model.embedding.word_embeddings.weight
    saved = embedding.detach().clone()
    with torch.no_grad():
        embedding.add_(torch.randn(embedding.shape, generator=torch.Generator().manual_seed(3)))
    changed = _batch_dict(engine.generate(prompts, sampling))
    with torch.no_grad():
        embedding.copy_(saved)
    restored = _batch_dict(engine.generate(prompts, sampling))
    engine.release()
    return dict(
        all_in_model=all(t.data_ptr() in model_pointers for t in read),
        tensors_read=len(read),
        changed=[s["token_ids"] for s in changed] != [s["token_ids"] for s in first],
        restored=restored == first,
        released=engine.cache is None,
    )


def _slot_checks(model, arch, prompts: list[list[int]], eos: int) -> dict:
    """Same samples with 1, 3 and 8 slots and a tiny prefill budget (many refills), against the reference."""
    runs = {"t1": dataclasses.replace(SAMPLED["t1"], max_new_tokens=14), "topk_topp": SAMPLED["topk_topp"]}
    out = {}
    for slots in SLOT_COUNTS:
        out[slots] = _against_reference(model, arch, prompts, (eos,), runs, max_slots=slots, prefill_token_budget=4)
    return out


def _error_checks(model, arch, prompts: list[list[int]]) -> dict:
    from megatron_gopd.rollout import FastRolloutEngine

    base = SAMPLED["t1"]
    engine = FastRolloutEngine(model, arch)
    return {
        "budget below one sample": _expect_value_error(lambda: FastRolloutEngine(model, arch, kv_cache_gb=1e-7)),
        "zero slots": _expect_value_error(lambda: FastRolloutEngine(model, arch, max_slots=0)),
        "empty prompt": _expect_value_error(lambda: engine.generate([prompts[0], []], base)),
        "too long": _expect_value_error(lambda: engine.generate([[1] * MAX_POSITIONS], base)),
    }


def _tp1_checks(hf_dir: str, prompts: list[list[int]]) -> dict:
    from megatron_gopd.bridge import load_hf_weights
    from megatron_gopd.models import ModelArchitecture, ParallelLayout, build_gpt_model
    from megatron_gopd.rollout import FastRolloutEngine, MegatronRolloutEngine

    arch = ModelArchitecture.from_pretrained(hf_dir)
    model = build_gpt_model(arch, ParallelLayout(), perform_initialization=False)
    load_hf_weights(model, arch, hf_dir)
    model.eval()
    greedy = MegatronRolloutEngine(model, arch).generate(prompts, _runs()["greedy"])
    # EOS and stop tokens taken from the greedy output, so that they do occur mid-response.
    eos, stop = greedy[0].token_ids[4], greedy[1].token_ids[7]
    out: dict[str, Any] = {"eos": eos, "stop": stop}
    out["reference"] = _against_reference(model, arch, prompts, (eos,), _runs((eos, stop)))
    long_prompt = (prompts[0] * MAX_POSITIONS)[: MAX_POSITIONS - 3]  # the context ends 3 tokens later
    out["context_limit"] = _against_reference(
        model, arch, [long_prompt, prompts[1]], (), {"greedy": _runs()["greedy"]}, max_slots=1
    )
    out["slots"] = _slot_checks(model, arch, prompts, eos)
    limited = FastRolloutEngine(model, arch).generate(
        prompts, _runs()["greedy"], max_new_tokens_per_prompt=[3, 1, 5, GREEDY_NEW_TOKENS + 9]
    )
    out["per_prompt_limits"] = dict(
        tokens=[s.token_ids for s in limited],
        reasons=[s.finish_reason for s in limited],
        full=[s.token_ids for s in greedy],
        error=_expect_value_error(
            lambda: FastRolloutEngine(model, arch).generate(
                prompts, _runs()["greedy"], max_new_tokens_per_prompt=[3, 0, 1, 1]
            )
        ),
    )
    out["forward"] = _forward_equivalence(model, arch, prompts[1] + greedy[1].token_ids, prefill_len=len(prompts[1]))
    out["decode_step"] = _decode_step_checks(model, arch)
    out["in_place"] = _in_place_checks(model, arch, prompts)
    out["errors"] = _error_checks(model, arch, prompts)
    llama_arch = tiny_arch(TINY_LLAMA)
    llama = build_gpt_model(llama_arch, ParallelLayout()).eval()
    sequence = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    out["llama_forward"] = _forward_equivalence(llama, llama_arch, sequence, prefill_len=9)
    return out


def _fast_body(rank: int, world_size: int, hf_dir: str, prompts: list[list[int]]) -> dict:
    from megatron_gopd import platform
    from megatron_gopd.bridge import load_hf_weights
    from megatron_gopd.models import ModelArchitecture, ParallelLayout, build_gpt_model
    from megatron_gopd.rollout import MegatronRolloutEngine, build_rollout_engine

    arch = ModelArchitecture.from_pretrained(hf_dir)
    results: dict[str, Any] = {}
    platform.init_model_parallel(tp=1, pp=1)
    if rank == 0:  # TP=1 needs one rank; the other waits at the next collective
        results["tp1"] = _tp1_checks(hf_dir, prompts)

    platform.init_model_parallel(tp=2, pp=1)
    model = build_gpt_model(arch, ParallelLayout(tp=2), perform_initialization=False)
    load_hf_weights(model, arch, hf_dir)
    greedy = MegatronRolloutEngine(model, arch).generate(prompts, _runs()["greedy"])
    eos, stop = greedy[0].token_ids[4], greedy[1].token_ids[7]
    results["tp2"] = _against_reference(model, arch, prompts, (eos,), _runs((eos, stop)), max_slots=3)
    results["tp2_forward"] = _forward_equivalence(
        model, arch, prompts[1] + greedy[1].token_ids, prefill_len=len(prompts[1])
    )
    engine = build_rollout_engine("auto", model, arch)
    results["tp2_auto"] = type(engine).__name__
    try:
        engine.generate([prompts[rank]], SAMPLED["t1"])
        results["tp2_mismatch"] = "<no error>"
    except RuntimeError as error:
        results["tp2_mismatch"] = str(error)

    platform.init_model_parallel(tp=1, pp=2)
    model = build_gpt_model(arch, ParallelLayout(pp=2), perform_initialization=False)
    results["pp2_auto"] = type(build_rollout_engine("auto", model, arch)).__name__
    results["pp2_fast"] = _expect_value_error(lambda: build_rollout_engine("fast", model, arch))
    return results


# ----------------------------------------------------------------------------------------------
# Multi-process checks


def _assert_matches(comparison: dict, where: str) -> None:
    for run_name, result in comparison.items():
        assert not result["mismatches"], f"{where} {run_name}: " + "; ".join(result["mismatches"][:3])
        assert result["logprobs"] < 1e-5 and result["sampler_logprobs"] < 1e-5, (where, run_name, result)


@pytest.mark.slow
def test_same_samples_as_the_megatron_engine_tp1(dist_results):
    tp1 = dist_results[0]["tp1"]
    _assert_matches(tp1["reference"], "tp1")
    _assert_matches(tp1["context_limit"], "tp1 context limit")
    assert set(tp1["reference"]) == {"greedy", *SAMPLED, "greedy_stop", "t1_stop", "t1_no_logprobs"}
    assert tp1["reference"]["greedy_stop"]["reasons"] == ["eos", "length", "stop"]  # all three did occur
    assert tp1["context_limit"]["greedy"]["reasons"] == ["length"]


@pytest.mark.slow
def test_same_samples_as_the_megatron_engine_tp2(dist_results):
    for rank, result in enumerate(dist_results):
        _assert_matches(result["tp2"], f"tp2 rank {rank}")
        assert result["tp2_auto"] == "FastRolloutEngine"
        assert "different prompts" in result["tp2_mismatch"]


@pytest.mark.slow
def test_per_prompt_response_limits(dist_results):
    check = dist_results[0]["tp1"]["per_prompt_limits"]
    assert check["tokens"][:3] == [full[:n] for full, n in zip(check["full"], (3, 1, 5))]
    # A limit replaces max_new_tokens, so it may also exceed it (the context allows it here).
    assert [len(t) for t in check["tokens"]] == [3, 1, 5, GREEDY_NEW_TOKENS + 9]
    assert check["tokens"][3][:GREEDY_NEW_TOKENS] == check["full"][3]
    assert check["reasons"] == ["length"] * 4
    assert "max_new_tokens_per_prompt" in check["error"]


@pytest.mark.slow
def test_same_samples_with_1_3_and_8_slots(dist_results):
    for slots, comparison in dist_results[0]["tp1"]["slots"].items():
        _assert_matches(comparison, f"{slots} slots")


@pytest.mark.slow
def test_prefill_and_decode_equal_a_full_forward_and_keys_are_stored_rotated(dist_results):
    checks = {
        "qwen3 tp1": dist_results[0]["tp1"]["forward"],
        "llama tp1": dist_results[0]["tp1"]["llama_forward"],
        **{f"qwen3 tp2 rank {r}": result["tp2_forward"] for r, result in enumerate(dist_results)},
    }
    for where, check in checks.items():
        assert check["logits"] < 1e-4, (where, check)
        assert check["keys"] < 1e-5 and check["key_scale"] > 0.1, (where, check)


@pytest.mark.slow
def test_decode_step_traces_whole_and_writes_only_its_positions(dist_results):
    check = dist_results[0]["tp1"]["decode_step"]
    assert check["untouched"] and check["changed"] and check["same_buffers"], check
    assert check["compiled_gap"] < 1e-5


@pytest.mark.slow
def test_reads_parameters_in_place(dist_results):
    check = dist_results[0]["tp1"]["in_place"]
    assert check["all_in_model"] and check["tensors_read"] > 10, check
    assert check["changed"], "an in-place parameter change did not alter the next generation"
    assert check["restored"] and check["released"], check


@pytest.mark.slow
def test_bad_input_and_unsupported_models(dist_results):
    errors = dist_results[0]["tp1"]["errors"]
    assert "kv_cache_gb" in errors["budget below one sample"] and "holds no sample" in errors["budget below one sample"]
    assert "max_slots" in errors["zero slots"]
    assert "prompt 1 is empty" in errors["empty prompt"]
    assert f"context is {MAX_POSITIONS} tokens" in errors["too long"]
    for result in dist_results:
        assert result["pp2_auto"] == "MegatronRolloutEngine"
        assert "'fast' was requested" in result["pp2_fast"] and "pipeline parallelism" in result["pp2_fast"]


# ----------------------------------------------------------------------------------------------
# Single-process checks


def test_slot_allocator_invariants_under_random_admission():
    rng = random.Random(0)
    for trial in range(50):
        allocator = SlotAllocator(rng.randint(1, 9))
        queue, live = list(range(rng.randint(1, 40))), []
        while queue or live:
            while queue and allocator.num_free and rng.random() < 0.7:
                sample = queue.pop(0)
                slot = allocator.acquire(sample)
                assert slot == min(s for s in range(allocator.num_slots) if allocator.owner[s] in (None, sample))
                live.append(sample)
            for sample in [s for s in live if rng.random() < 0.3]:
                allocator.release(sample)
                live.remove(sample)
            if not queue and rng.random() < 0.5:
                for sample, to_slot in allocator.compaction_moves():
                    allocator.move(sample, to_slot)
                assert allocator.high_water == allocator.num_live
            allocator.check()
            assert sorted(allocator.slot_of) == sorted(live)
        assert allocator.num_live == 0 and allocator.high_water == 0, trial
    allocator = SlotAllocator(2)
    allocator.acquire(7)
    with pytest.raises(RuntimeError, match="already holds"):
        allocator.acquire(7)
    with pytest.raises(ValueError, match="at least one slot"):
        SlotAllocator(0)


def test_kv_budget_sets_the_slot_count():
    shape = KVSlotShape(num_layers=28, kv_heads=8, head_dim=128, dtype=torch.bfloat16)
    assert shape.bytes_per_token() == 112 * 1024  # Qwen3-0.6B / 1.7B: 112 KiB of bf16 KV per token
    tiny = KVSlotShape.for_model(tiny_arch(TINY_QWEN3), 2, torch.float32)
    assert (tiny.num_layers, tiny.kv_heads, tiny.head_dim) == (4, 1, 32)
    assert slots_for_budget(shape, 17_408, 80e9) == int(80e9 // (112 * 1024 * 17_408))
    with pytest.raises(ValueError, match="kv_cache_gb: a KV budget of 1 GB holds no sample of 17408 tokens"):
        slots_for_budget(shape, 17_408, 1e9)


@pytest.mark.parametrize("heads, groups", [(4, 2), (4, 4), (6, 1)])
def test_attention_kernels_equal_the_reference(heads, groups):
    generator = torch.Generator().manual_seed(heads * 10 + groups)
    q = torch.randn(5, heads, 16, generator=generator)
    keys, values = torch.randn(2, 5, groups, 40, 16, generator=generator)  # [B, G, positions, d]
    lengths = torch.tensor([1, 7, 40, 23, 2])
    want = reference_decode_attention(q, keys, values, lengths, 0.25)
    assert torch.allclose(
        grouped_decode_attention(q, keys[:, :, :32], values[:, :, :32], lengths.clamp(max=32), 0.25),
        reference_decode_attention(q, keys, values, lengths.clamp(max=32), 0.25),
        atol=1e-5,
    )
    assert torch.allclose(grouped_decode_attention(q, keys, values, lengths, 0.25), want, atol=1e-5)
    cu_seqlens = [0, 3, 4, 12]
    packed_q = torch.randn(12, heads, 16, generator=generator)
    packed_k, packed_v = torch.randn(2, 12, groups, 16, generator=generator)
    assert torch.allclose(
        packed_prefill_attention(packed_q, packed_k, packed_v, cu_seqlens, 0.25),
        reference_prefill_attention(packed_q, packed_k, packed_v, cu_seqlens, 0.25),
        atol=1e-5,
    )


def test_unsupported_reasons_from_architecture_and_layout():
    from megatron_gopd.models import ParallelLayout

    assert fast_engine_unsupported_reason(arch=tiny_arch(TINY_QWEN3)) is None
    assert "mixture-of-experts" in fast_engine_unsupported_reason(arch=tiny_arch(TINY_QWEN3_MOE))
    assert "pipeline" in fast_engine_unsupported_reason(layout=ParallelLayout(pp=2))
    assert "sequence parallelism" in fast_engine_unsupported_reason(layout=ParallelLayout(tp=2, sequence_parallel=True))
    assert "key/value heads" in fast_engine_unsupported_reason(arch=tiny_arch(TINY_QWEN3), layout=ParallelLayout(tp=4))
