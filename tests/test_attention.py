"""SDPA core attention (`SDPAttention`) against megatron-core's local `DotProductAttention`, packing.

Checks that need no process group (the attention functions, `pack_sequences`, bad input) run in
the test process. Everything that builds a model runs in one launch of 2 gloo ranks
(`_attention_body`): the core modules side by side (masks, KV-cached decoding, GQA), a whole tiny
Qwen3 with each backend at TP=1, TP=2 (with and without sequence parallelism) and PP=2 loaded from
one checkpoint (logits and every gradient), packed micro-batches against each sequence run alone,
KV-cached decoding against a full forward, and a forward + backward of an 8K-token packed
micro-batch within a bound on resident memory. The test functions read that launch's results.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import pytest
import torch

from megatron_gopd.packing import pack_sequences
from tests.dist_harness import run_distributed

TOLERANCE = 1e-5  # fp32: SDPA and the local attention differ only in summation order
LAYOUTS = {"tp1": (1, 1, False), "tp2": (2, 1, False), "tp2sp": (2, 1, True), "pp2": (1, 2, False)}
PACKED_LENGTHS = (14, 4, 18)  # even: an unpacked run of each must split over 2 SP ranks
PAD_TO = 8  # the packed row (36 tokens) gets a 4-token padding sequence
LONG_LENGTHS = (5000, 3192)  # the 8K-token packed micro-batch
LONG_MEMORY_BOUND = 384 * 2**20  # measured ~180 MiB; a [t, t] float mask (256 MiB) would break it


# ----------------------------------------------------------------------------------------------
# In the test process: the attention functions and the packing helper


def _reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Explicit softmax attention in float64 on ``[b, n, s, d]``, key/value heads repeated."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    scores = q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def test_grouped_sdpa_equals_explicit_softmax():
    from megatron_gopd.models.attention import grouped_sdpa

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 8, generator=gen)
    k, v = torch.randn(2, 2, 9, 8, generator=gen), torch.randn(2, 2, 9, 8, generator=gen)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    got = grouped_sdpa(q, k, v, 8**-0.5, is_causal=True)
    assert (got.double() - _reference_attention(q, k, v, causal)).abs().max() < 1e-6
    # Query head h reads key/value head h // 2 (Megatron's grouping), not h % 2.
    swapped = grouped_sdpa(q, k.flip(1), v.flip(1), 8**-0.5, is_causal=True)
    assert (swapped - got).abs().max() > 1e-2
    with pytest.raises(ValueError, match="3 query heads per partition is not a multiple of 2"):
        grouped_sdpa(q[:, :3], k, v, 1.0, is_causal=True)


def test_packed_attention_equals_each_sequence_alone_with_gradients():
    from megatron_gopd.models.attention import grouped_sdpa, packed_causal_attention

    gen = torch.Generator().manual_seed(1)
    lengths = [5, 1, 12, 7]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    total = sum(lengths)
    q = torch.randn(total, 4, 8, generator=gen, requires_grad=True)  # [t, heads, d]
    k = torch.randn(total, 2, 8, generator=gen, requires_grad=True)  # [t, groups, d]
    v = torch.randn(total, 2, 8, generator=gen, requires_grad=True)
    weights = torch.randn(total, 4, 8, generator=gen)
    packed = packed_causal_attention(q, k, v, cu, 0.3)
    (packed * weights).sum().backward()
    packed_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        # [len, n, d] -> [1, n, len, d]
        alone = grouped_sdpa(*(t[start:end].transpose(0, 1)[None] for t in (q, k, v)), 0.3, is_causal=True)[
            0
        ].transpose(0, 1)
        assert (alone - packed[start:end]).abs().max() < 1e-6, (start, end)
        (alone * weights[start:end]).sum().backward()
    for packed_grad, tensor in zip(packed_grads, (q, k, v)):
        assert (packed_grad - tensor.grad).abs().max() < 1e-6


def test_pack_sequences_layout_and_unpack():
    batch = pack_sequences([[5, 6, 7], [8], [9, 10]], pad_to_multiple_of=4, pad_id=3)
    assert batch.tokens.tolist() == [[5, 6, 7, 8, 9, 10, 3, 3]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 0, 1, 0, 1]]  # RoPE restarts per sequence
    params = batch.packed_seq_params
    assert params.qkv_format == "thd" and params.cu_seqlens_q.dtype == torch.int32
    assert params.cu_seqlens_q.tolist() == [0, 3, 4, 6, 8]  # the padding is a sequence of its own
    assert params.cu_seqlens_kv.tolist() == [0, 3, 4, 6, 8]
    assert params.max_seqlen_q == params.max_seqlen_kv == 3
    assert batch.lengths == [3, 1, 2] and batch.num_padding == 2
    logits = torch.arange(8.0).view(1, 8, 1).expand(1, 8, 5)  # [1, t, V]
    assert [piece[0, :, 0].tolist() for piece in batch.unpack(logits)] == [[0, 1, 2], [3], [4, 5]]
    hidden = torch.arange(8.0).view(8, 1, 1)  # [t, 1, h]
    assert [piece.shape[0] for piece in batch.unpack(hidden, dim=0)] == [3, 1, 2]
    assert pack_sequences([[1, 2]], pad_to_multiple_of=2).num_padding == 0


@pytest.mark.parametrize(
    "sequences, options, message",
    [
        ([], {}, "at least one sequence"),
        ([[1, 2], [], [3]], {}, r"sequences \[1\] are empty"),
        ([[1]], {"pad_to_multiple_of": 0}, "pad_to_multiple_of must be >= 1"),
    ],
)
def test_pack_sequences_rejects_bad_input(sequences, options, message):
    with pytest.raises(ValueError, match=message):
        pack_sequences(sequences, **options)


def test_unpack_rejects_values_of_another_length():
    batch = pack_sequences([[1, 2, 3]])
    with pytest.raises(ValueError, match="values have 4 positions along dim 1, the packed batch 3"):
        batch.unpack(torch.zeros(1, 4, 2))


def test_layer_spec_names_unknown_attention():
    from megatron_gopd.models import layer_spec
    from tests.megatron_utils import tiny_arch

    with pytest.raises(
        ValueError,
        match=r"attention='flash' is not supported; choose one of "
        r"\['auto', 'sdpa', 'local'\]",
    ):
        layer_spec(tiny_arch(), 2, attention="flash")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_packed_attention_matches_per_sequence_sdpa_in_bf16():
    from megatron_gopd.models.attention import grouped_sdpa, packed_causal_attention

    gen = torch.Generator(device="cuda").manual_seed(0)
    lengths = [300, 17, 1024]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    shape = (sum(lengths), 8, 128)
    q = torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16)
    k = torch.randn((shape[0], 2, 128), generator=gen, device="cuda", dtype=torch.bfloat16)
    v = torch.randn((shape[0], 2, 128), generator=gen, device="cuda", dtype=torch.bfloat16)
    packed = packed_causal_attention(q, k, v, cu, 128**-0.5).float()
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone = grouped_sdpa(
            *(t[start:end].float().transpose(0, 1)[None] for t in (q, k, v)), 128**-0.5, is_causal=True
        )[0].transpose(0, 1)
        assert (alone - packed[start:end]).abs().max() < 2e-2


# ----------------------------------------------------------------------------------------------
# What every rank runs


def _zero_grads(model) -> None:
    for param in model.parameters():
        param.grad = None


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: param.grad.detach().clone() for name, param in model.named_parameters() if param.grad is not None}


def _max_grad_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert got.keys() == want.keys() and got, (sorted(got), sorted(want))
    return max((got[name] - want[name]).abs().max().item() for name in got)


def _forward_backward(
    model,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    vocab_size: int,
    normaliser: int,
    real_tokens: int,
    packed_seq_params=None,
) -> Optional[torch.Tensor]:
    """Forward + backward through Megatron's schedule of ``sum(log_softmax[:real_tokens, :50]) /
    normaliser`` (a loss that adds up over sequences); the logits ``[b, s, V]`` on the last stage.

    Gradients accumulate over calls; sequence-parallel norm gradients are left unreduced.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    collected: dict[str, torch.Tensor] = {}

    def loss_func(output: torch.Tensor):
        full = gather_from_tensor_model_parallel_region(output)[..., :vocab_size]  # [b, s, V]
        collected["logits"] = full.detach()
        loss = full.log_softmax(-1)[:, :real_tokens, :50].sum() / normaliser
        return loss, {"loss": loss.detach()}

    def forward_step(data_iterator, model):
        return model(tokens, positions, None, packed_seq_params=packed_seq_params), loss_func

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([None]),
        model=[model],
        num_microbatches=1,
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
        forward_only=False,
    )
    return collected.get("logits") if parallel_state.is_pipeline_last_stage() else None


def _packing_checks(model, sequences: list[list[int]], vocab_size: int, pad_to: int) -> dict:
    """A packed micro-batch against each sequence run alone (unpacked): logits and gradients."""
    from tests.megatron_utils import _allreduce_sequence_parallel_grads

    batch = pack_sequences(sequences, pad_to_multiple_of=pad_to)
    real = sum(batch.lengths)
    _zero_grads(model)
    packed_logits = _forward_backward(
        model,
        batch.tokens,
        batch.position_ids,
        vocab_size,
        real,
        batch.tokens.shape[1] - batch.num_padding,
        batch.packed_seq_params,
    )
    _allreduce_sequence_parallel_grads(model)
    packed_grads = _grads(model)
    _zero_grads(model)  # the alone runs accumulate their gradients
    logit_diff = 0.0
    for index, sequence in enumerate(sequences):
        tokens = torch.tensor([sequence])  # [1, len]
        positions = torch.arange(len(sequence))[None]
        alone = _forward_backward(model, tokens, positions, vocab_size, real, len(sequence))
        if alone is not None:
            piece = batch.unpack(packed_logits)[index]
            logit_diff = max(logit_diff, (piece - alone).abs().max().item())
    _allreduce_sequence_parallel_grads(model)  # once: it is linear in the accumulated gradients
    return dict(logit_diff=logit_diff, grad_diff=_max_grad_diff(packed_grads, _grads(model)), padding=batch.num_padding)


def _core_module_checks(arch) -> dict:
    """`SDPAttention` and `DotProductAttention` built alike, fed the same q, k, v (TP=1)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_gopd.models import ParallelLayout, transformer_config
    from megatron_gopd.models.attention import SDPAttention

    config = transformer_config(arch, ParallelLayout())
    modules = {
        cls.__name__: cls(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
        for cls in (SDPAttention, DotProductAttention)
    }
    gen = torch.Generator().manual_seed(3)
    heads, groups, dim = arch.num_attention_heads, arch.num_query_groups, arch.kv_channels
    s, b = 9, 2
    q = torch.randn(s, b, heads, dim, generator=gen)  # [s, b, heads, d]
    k, v = torch.randn(s, b, groups, dim, generator=gen), torch.randn(s, b, groups, dim, generator=gen)
    report: dict[str, Any] = {}

    outputs, grads = {}, {}
    for name, module in modules.items():
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        outputs[name] = module(*inputs, None)  # [s, b, heads * d]
        weights = torch.linspace(-1, 1, outputs[name].numel()).view_as(outputs[name])
        (outputs[name] * weights).sum().backward()
        grads[name] = [t.grad for t in inputs]
    report["causal_out"] = (outputs["SDPAttention"] - outputs["DotProductAttention"]).abs().max().item()
    report["causal_grad"] = max(
        (a - b).abs().max().item() for a, b in zip(grads["SDPAttention"], grads["DotProductAttention"])
    )
    report["shape"] = list(outputs["SDPAttention"].shape)

    # Megatron's KV-cached decode step: one new query, every cached key, attn_mask_type no_mask.
    decode = {name: module(q[-1:], k, v, None, attn_mask_type=AttnMaskType.no_mask) for name, module in modules.items()}
    report["decode"] = (decode["SDPAttention"] - decode["DotProductAttention"]).abs().max().item()
    # ... and equals the last row of the full causal attention.
    last_row = outputs["SDPAttention"][-1]
    report["decode_vs_causal_last_row"] = (decode["SDPAttention"][0] - last_row).abs().max().item()

    # An explicit boolean mask (True = masked) replaces the causal one, as in the local module.
    masked = torch.ones(s, s, dtype=torch.bool).triu(1)
    masked[:, 0] = True  # nobody may read the first key ...
    masked[0, 0] = False  # ... except the first query
    with_mask = {name: module(q, k, v, masked[None, None].expand(b, 1, s, s)) for name, module in modules.items()}
    report["mask"] = (with_mask["SDPAttention"] - with_mask["DotProductAttention"]).abs().max().item()

    # Fewer queries than keys under a causal mask: aligned to the last key (the local module asserts).
    chunk = modules["SDPAttention"](q[-3:], k, v, None)
    report["chunk_vs_causal_tail"] = (chunk - outputs["SDPAttention"][-3:]).abs().max().item()

    errors = {}
    try:
        SDPAttention(
            config=config,
            layer_number=1,
            attn_mask_type=AttnMaskType.causal,
            attention_type="self",
            attention_dropout=0.1,
        )
    except ValueError as error:
        errors["dropout"] = str(error)
    try:
        modules["SDPAttention"](q, k, v, None, attention_bias=torch.zeros(1))
    except ValueError as error:
        errors["bias"] = str(error)
    from megatron.core.packed_seq_params import PackedSeqParams

    short = torch.tensor([0, 5, 7], dtype=torch.int32)  # covers 7 of the 9 packed rows
    for name, qkv_format in (("short_cu_seqlens", "thd"), ("format", "sbhd")):
        params = PackedSeqParams(
            qkv_format=qkv_format, cu_seqlens_q=short, cu_seqlens_kv=short, max_seqlen_q=5, max_seqlen_kv=5
        )
        try:
            modules["SDPAttention"](q[:, 0], k[:, 0], v[:, 0], None, packed_seq_params=params)
        except ValueError as error:
            errors[name] = str(error)
    report["errors"] = errors
    return report


def _kv_cache_decode_check(model, reference, vocab_size: int, tokens: torch.Tensor, prefill: int) -> Optional[float]:
    """Largest logit difference of KV-cached decoding (`model`) and a full forward (`reference`)."""
    from megatron.core.inference.contexts import StaticInferenceContext

    batch, total = tokens.shape
    positions = torch.arange(total).expand(batch, -1)  # [b, s]
    model.eval()
    reference.eval()
    context = StaticInferenceContext(max_batch_size=batch, max_sequence_length=total)
    with torch.no_grad():
        want = reference(tokens, positions, None, runtime_gather_output=True)[..., :vocab_size]
        steps = [
            model(
                tokens[:, :prefill], positions[:, :prefill], None, inference_context=context, runtime_gather_output=True
            )
        ]
        context.increment_sequence_len_offset(prefill)
        context.enable_decode_mode()
        for position in range(prefill, total):
            step = slice(position, position + 1)
            steps.append(
                model(tokens[:, step], positions[:, step], None, inference_context=context, runtime_gather_output=True)
            )
            context.increment_sequence_len_offset(1)
    # The prefill returns only its last position's logits (the context's default).
    got = torch.cat(steps, dim=1)[..., :vocab_size]  # [b, s - prefill + 1, V]
    model.train()
    reference.train()
    return (got - want[:, prefill - 1 :]).abs().max().item()


def _long_packed_memory_check() -> dict:
    """Forward + backward of an 8K-token packed micro-batch through a tiny SDPA model (TP=1)."""
    from megatron_gopd.models import ParallelLayout, build_gpt_model
    from megatron_gopd.testing.memory import PeakRSSGrowth
    from tests.megatron_utils import tiny_arch

    arch = tiny_arch(num_hidden_layers=2, head_dim=16, max_position_embeddings=8192)
    model = build_gpt_model(arch, ParallelLayout(), attention="sdpa")
    gen = torch.Generator().manual_seed(4)

    def step(lengths) -> torch.Tensor:
        sequences = [torch.randint(0, arch.vocab_size, (n,), generator=gen).tolist() for n in lengths]
        batch = pack_sequences(sequences)
        logits = model(
            batch.tokens, batch.position_ids, None, packed_seq_params=batch.packed_seq_params
        )  # [1, t, V/tp]
        loss = logits[..., : arch.vocab_size].float().log_softmax(-1)[..., :50].mean()
        loss.backward()
        return loss.detach()

    step((64, 32))  # kernels and allocator warm
    _zero_grads(model)
    with PeakRSSGrowth() as growth:
        loss = step(LONG_LENGTHS)
    grads_finite = all(torch.isfinite(p.grad).all().item() for p in model.parameters() if p.grad is not None)
    # What the local attention would hold for one layer of this micro-batch right-padded to one
    # row: fp32 scores [1, heads, 8192, 8192] (and as much again for the softmax probabilities).
    tokens = sum(LONG_LENGTHS)
    local_scores = 4 * arch.num_attention_heads * tokens * tokens
    return dict(
        growth=growth.bytes,
        exact=growth.exact,
        loss=float(loss),
        grads_finite=grads_finite,
        local_scores=local_scores,
        tokens=tokens,
    )


def _attention_body(rank: int, world_size: int, ckpt_dir: str) -> dict:
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_gopd import platform
    from megatron_gopd.models import ParallelLayout, build_gpt_model
    from megatron_gopd.models.attention import PackingNotSupportedError, require_packing_support
    from tests.megatron_utils import forward_logits, tiny_arch

    arch = tiny_arch()  # 4 layers, 4 query heads in 2 groups, head_dim 32
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, arch.vocab_size, (2, 24), generator=gen)
    sequences = [torch.randint(0, arch.vocab_size, (n,), generator=gen).tolist() for n in PACKED_LENGTHS]
    results: dict[str, Any] = {}

    platform.init_model_parallel(tp=1, pp=1, seed=11)
    results["core"] = _core_module_checks(arch)
    reference = build_gpt_model(arch, ParallelLayout(), attention="local")
    ref_logits, _ = forward_logits(reference, tokens, arch.vocab_size, with_backward=True)
    try:
        require_packing_support(reference)
        results["packing_refused"] = "<no error>"
    except PackingNotSupportedError as error:
        results["packing_refused"] = str(error)
    if rank == 0:
        os.makedirs(ckpt_dir)
    torch.distributed.barrier()
    dist_checkpointing.save(reference.sharded_state_dict(), ckpt_dir)
    torch.distributed.barrier()

    for name, (tp, pp, sp) in LAYOUTS.items():
        platform.init_model_parallel(tp=tp, pp=pp, seed=99)  # weights must come from the ckpt
        layout = ParallelLayout(tp=tp, pp=pp, sequence_parallel=sp)
        per_backend = {}
        models = {}
        for backend in ("local", "sdpa"):
            model = build_gpt_model(arch, layout, perform_initialization=False, attention=backend)
            model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir))
            logits, loss = forward_logits(model, tokens, arch.vocab_size, with_backward=True)
            per_backend[backend] = (logits, loss, _grads(model))
            models[backend] = model
        (local_logits, local_loss, local_grads), (logits, loss, grads) = per_backend.values()
        check: dict[str, Any] = dict(
            grad_vs_local=_max_grad_diff(grads, local_grads), last_stage=parallel_state.is_pipeline_last_stage()
        )
        if check["last_stage"]:
            check.update(
                logit_vs_local=(logits - local_logits).abs().max().item(),
                logit_vs_tp1_local=(logits - ref_logits).abs().max().item(),
                loss_vs_local=abs(loss - local_loss),
            )
        check["packing"] = _packing_checks(models["sdpa"], sequences, arch.vocab_size, PAD_TO)
        if name == "tp2":
            check["kv_cache_decode"] = _kv_cache_decode_check(
                models["sdpa"], models["local"], arch.vocab_size, tokens[:, :12], prefill=5
            )
        results[name] = check

    platform.init_model_parallel(tp=1, pp=1, seed=5)
    if rank == 0:  # the other rank waits: both at once would only share the two cores
        results["long_packed"] = _long_packed_memory_check()
    torch.distributed.barrier()
    return results


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory) -> list[dict]:
    """Every multi-process check, in one launch of 2 ranks; one result dict per rank."""
    ckpt_dir = tmp_path_factory.mktemp("attention") / "ckpt"
    return run_distributed(_attention_body, world_size=2, timeout=600.0, ckpt_dir=str(ckpt_dir))


# ----------------------------------------------------------------------------------------------
# Multi-process checks


@pytest.mark.slow
def test_core_module_matches_local_dot_product_attention(dist_results):
    for result in dist_results:
        core = result["core"]
        assert core["shape"] == [9, 2, 4 * 32]  # [s, b, heads * d]
        for check in ("causal_out", "causal_grad", "decode", "mask"):
            assert core[check] < 1e-6, (check, core)
        assert core["decode_vs_causal_last_row"] < 1e-6, core
        assert core["chunk_vs_causal_tail"] < 1e-6, core


@pytest.mark.slow
def test_core_module_refuses_what_it_cannot_run(dist_results):
    errors = dist_results[0]["core"]["errors"]
    assert "attention_dropout=0.1 (needs 0)" in errors["dropout"]
    assert "attention_bias" in errors["bias"]
    assert "cu_seqlens_q [0, 5, 7] must rise from 0 to the packed length 9" in errors["short_cu_seqlens"]
    assert "qkv_format 'thd', got 'sbhd'" in errors["format"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sdpa_model_matches_local_model(dist_results, layout):
    last_stages = 0
    for rank, result in enumerate(dist_results):
        check = result[layout]
        assert check["grad_vs_local"] < TOLERANCE, (layout, rank, check)
        if check["last_stage"]:
            last_stages += 1
            assert check["logit_vs_local"] < TOLERANCE, (layout, rank, check)
            assert check["logit_vs_tp1_local"] < TOLERANCE, (layout, rank, check)
            assert check["loss_vs_local"] < 1e-6, (layout, rank, check)
    assert last_stages >= 1


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_packed_micro_batch_equals_each_sequence_alone(dist_results, layout):
    for rank, result in enumerate(dist_results):
        packing = result[layout]["packing"]
        assert packing["padding"] == PAD_TO - sum(PACKED_LENGTHS) % PAD_TO
        assert packing["logit_diff"] < TOLERANCE, (layout, rank, packing)
        assert packing["grad_diff"] < TOLERANCE, (layout, rank, packing)


@pytest.mark.slow
def test_kv_cached_decoding_with_sdpa_equals_full_forward(dist_results):
    for rank, result in enumerate(dist_results):
        assert result["tp2"]["kv_cache_decode"] < TOLERANCE, rank


@pytest.mark.slow
def test_packing_with_local_attention_is_refused(dist_results):
    message = dist_results[0]["packing_refused"]
    assert "local DotProductAttention (attention='local')" in message
    assert "cannot take packed sequences" in message and "attention='sdpa'" in message


@pytest.mark.slow
def test_long_packed_micro_batch_trains_within_memory_bound(dist_results):
    long = dist_results[0]["long_packed"]
    assert long["tokens"] == 8192 and long["grads_finite"] and math.isfinite(long["loss"])
    # The local attention would need 1 GiB of scores per layer here; SDPA must stay far below.
    assert long["local_scores"] == 2**30
    assert long["growth"] < LONG_MEMORY_BOUND, (
        f"forward + backward of 8K packed tokens grew the resident set by "
        f"{long['growth'] / 2**20:.0f} MiB (bound {LONG_MEMORY_BOUND / 2**20:.0f} MiB, "
        f"exact={long['exact']})"
    )
