"""One pool model's forward-only pass over one replica's sequences, and the sequences themselves.

A `ScoredSequence` is a model's input for one request: the prompt in that model's chat template,
then the student's response ids (appended unchanged, never re-tokenised). A replica packs its
sequences into micro-batches of at most ``micro_batch_tokens`` tokens (`batching.pack_by_tokens`,
lengths rounded up to a multiple of TP for sequence parallelism): packed end to end in one
``[1, t]`` row (`ModelPlan.packed`: the summed lengths count, each sequence attends only to
itself) or right-padded ``[b, s]`` rows (rows x padded length count), and runs them through
Megatron's pipeline schedule (`get_forward_backward_func`, with
the model's own groups and P2P communicator). Log-probs of the sampled tokens are taken at
temperature 1 over the model's real vocabulary (Megatron's padded rows masked) with
`megatron_gopd.logprobs` from the model's final hidden states and output weight, a chunk of positions
at a time, through the same head GEMM as the student's (`logprobs.head_gemm`: 16-bit inputs on GPU,
fp32 accumulation and fp32 logits), so no model's log-probs carry bf16 logit rounding (a step of
~0.125 near |z| ~ 20, ~0.1 nats per token) and full logits never exist. MoE models route
dropless (set by the model builder), so a token's log-prob does not depend on its batch; replicas
of one expert-parallel group run the same number of micro-batches (one-token dummies fill the gap)
because their all-to-alls pair up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from megatron_gopd import platform
from megatron_gopd.batching import pad_token_rows
from megatron_gopd.checkpointing import load_model_checkpoint
from megatron_gopd.logprobs import token_logprobs_from_logits, topk_logprobs_from_logits
from megatron_gopd.logprobs.head_gemm import fp32_mm, head_gemm_dtype
from megatron_gopd.logprobs.shared import chunk_positions
from megatron_gopd.models.output_head import OutputHead
from megatron_gopd.packing import pack_sequences
from megatron_gopd.scoring.plan import ModelPlan

__all__ = [
    "ForwardBatch",
    "ScoredSequence",
    "collate_forward",
    "decode_sequences",
    "encode_sequences",
    "load_pool_model",
    "run_forward",
]


@dataclass
class ScoredSequence:
    """One model's input for one request: its prompt ids followed by the student's response ids."""

    tokens: list[int]
    prompt_len: int
    extra_targets: Optional[torch.Tensor] = None
    """``[response_len, k]`` int64 token ids whose log-probs are wanted at each response position
    besides the sampled token's (a reference scoring its teacher's top-k), or None."""

    @property
    def response_len(self) -> int:
        """Tokens after the prompt: the student's response."""
        return len(self.tokens) - self.prompt_len


def encode_sequences(sequences: Sequence[ScoredSequence], device: torch.device) -> torch.Tensor:
    """[n, then (length, prompt_len, k) per sequence, then per sequence its tokens and its
    ``response_len * k`` extra targets] as one int64 tensor (k = 0 without extra targets)."""
    header = [len(sequences)]
    body: list[torch.Tensor] = []
    for s in sequences:
        k = 0 if s.extra_targets is None else s.extra_targets.shape[1]
        header += [len(s.tokens), s.prompt_len, k]
        body.append(torch.tensor(s.tokens, dtype=torch.int64))
        if k:
            body.append(s.extra_targets.reshape(-1).to(torch.int64).cpu())
    return torch.cat([torch.tensor(header, dtype=torch.int64), *body]).to(device)


def decode_sequences(flat: torch.Tensor) -> list[ScoredSequence]:
    """The sequences `encode_sequences` wrote (an empty tensor: none)."""
    values = flat.cpu()
    if not values.numel():
        return []
    count = int(values[0])
    header = values[1 : 1 + 3 * count].view(count, 3).tolist()
    pos = 1 + 3 * count
    sequences = []
    for length, prompt_len, k in header:
        tokens = values[pos : pos + length].tolist()
        pos += length
        extra = None
        if k:
            response_len = length - prompt_len
            extra = values[pos : pos + response_len * k].view(response_len, k).clone()
            pos += response_len * k
        sequences.append(ScoredSequence(tokens, prompt_len, extra))
    return sequences


@dataclass
class ForwardBatch:
    """One forward-only micro-batch of a replica (the same on every rank of the replica).

    Right-padded: sequence i of `indices` is row i, starting at position 0. Packed: one row, the
    sequences end to end, sequence i starting at ``starts[i]``.
    """

    tokens: torch.Tensor
    """[b, s] int64 token ids, right-padded with 0; packed: [1, t]."""
    positions: torch.Tensor
    """[b, s] int64 position ids (packed: restarting at 0 for every sequence)."""
    targets: torch.Tensor
    """[s, b] int64: the token each position predicts (the next one of its sequence; 0 past the
    end, anything at a packed sequence's last position, which predicts no response token);
    [s, b, 1 + k] when the sequences carry ``extra_targets`` (column 0 the next token, then the
    extra ids at response positions, 0 elsewhere)."""
    indices: list[int]
    """Which of the replica's sequences each row (packed: each segment) holds."""
    dummy: bool = False
    rows: Optional[list[int]] = None
    """Per sequence of `indices`: its row (None: row i)."""
    starts: Optional[list[int]] = None
    """Per sequence of `indices`: the position of its first token (None: 0)."""
    packed_seq_params: Any = None
    """Megatron `PackedSeqParams` (``thd``) of a packed micro-batch, None when right-padded."""

    def placement(self, i: int) -> tuple[int, int]:
        """(row, first position) of the i-th sequence of `indices`."""
        return (i if self.rows is None else self.rows[i]), (0 if self.starts is None else self.starts[i])


def collate_forward(
    sequences: Sequence[ScoredSequence],
    indices: list[int],
    multiple: int,
    dummy: bool = False,
    packed: bool = False,
) -> ForwardBatch:
    """Sequences `indices` of `sequences` as one micro-batch, its length a multiple of `multiple`:
    right-padded rows, or (`packed`) one row of the sequences end to end."""
    device = platform.device()
    rows = [sequences[i].tokens for i in indices]
    packing = None
    if packed:
        packing = pack_sequences(rows, pad_to_multiple_of=multiple, device=device)
        tokens, positions = packing.tokens, packing.position_ids  # [1, t]
        targets = torch.zeros_like(tokens)
        targets[:, :-1] = tokens[:, 1:]
        starts = packing.offsets
    else:
        tokens, targets, positions = pad_token_rows(rows, multiple=multiple)
        starts = [0] * len(indices)
    extra = [sequences[i].extra_targets for i in indices]
    if not dummy and extra[0] is not None:
        k = extra[0].shape[1]
        targets = torch.cat([targets.unsqueeze(-1), targets.new_zeros(targets.shape + (k,))], dim=-1)
        for i, (index, offset) in enumerate(zip(indices, starts)):
            seq = sequences[index]
            start = offset + seq.prompt_len - 1  # position t predicts token t + 1
            targets[0 if packed else i, start : start + seq.response_len, 1:] = seq.extra_targets.to(targets.device)
    return ForwardBatch(
        tokens.to(device),
        positions.to(device),
        targets.transpose(0, 1).contiguous().to(device),
        [] if dummy else list(indices),
        dummy,
        rows=[0] * len(indices) if packed else None,
        starts=starts if packed else None,
        packed_seq_params=None if packing is None else packing.packed_seq_params,
    )


def load_pool_model(plan: ModelPlan, pg_collection: Any):
    """Build `plan`'s model on its own process groups, load its checkpoint, freeze it (collective).

    The checkpoint's replica ids come from the model's own ``dp_cp`` group
    (`checkpointing.load_model_checkpoint`), so a model whose DP size differs from the student's
    (e.g. TP=2/PP=2 beside a DP=4 student) loads with exactly one main replica per shard.
    """
    from megatron_gopd.models import build_gpt_model
    from megatron_gopd.models.attention import require_packing_support

    model = build_gpt_model(
        plan.arch,
        plan.layout,
        dtype=plan.dtype,
        pg_collection=pg_collection,
        perform_initialization=False,
        attention=plan.attention,
    )
    if plan.packed:
        require_packing_support(model)
    load_model_checkpoint(model, plan.checkpoint)
    model.eval()
    model.requires_grad_(False)
    # Micro-batches differ in length: pipeline stages exchange shapes before activations.
    model.config.variable_seq_lengths = True
    return model


def run_forward(
    model: Any,
    plan: ModelPlan,
    pg_collection: Any,
    sequences: Sequence[ScoredSequence],
    batches: list[ForwardBatch],
    topk: int,
    is_last_stage: bool,
) -> list[torch.Tensor]:
    """Run this replica's `batches` forward-only; the sequences' response log-probs on the last stage.

    Returns ``[response_len, w]`` fp32 tensors, one per sequence, on the last pipeline stage (every
    TP rank), an empty list on the other stages. Columns: the sampled token's log-prob; then the
    log-probs of the sequences' ``extra_targets`` (k columns), if they have them; then, with
    `topk`, the model's top-k log-probs and ids (ids as fp32: exact below 2**24).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    if not batches:
        return []
    vocab_size = plan.arch.vocab_size
    results: list[Optional[torch.Tensor]] = [None] * len(sequences)

    head = OutputHead(model)

    def chunk_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """[c, b, V/tp] fp32 logits -> [c, b, w] columns (sampled, extra targets, top-k values, ids)."""
        logprobs = token_logprobs_from_logits(logits, targets, tp_group=pg_collection.tp, vocab_size=vocab_size)
        if logprobs.dim() == 2:
            logprobs = logprobs.unsqueeze(-1)
        if topk:
            values, ids = topk_logprobs_from_logits(logits, topk, tp_group=pg_collection.tp, vocab_size=vocab_size)
            logprobs = torch.cat([logprobs, values, ids.float()], dim=-1)
        return logprobs

    def loss_func(batch: ForwardBatch, output: torch.Tensor):
        # The final hidden states: logits come from the same fp32-accumulated head GEMM as the
        # student's (16-bit inputs on GPU), a chunk of positions at a time.
        hidden = output.transpose(0, 1)  # [s, b, h]
        seq_len, rows, width = hidden.shape
        weight = head.weight  # [V/tp, h]
        gemm = head_gemm_dtype(weight)
        step = chunk_positions(seq_len, rows, weight.shape[0], None)
        chunks = []
        for s0 in range(0, seq_len, step):
            s1 = min(s0 + step, seq_len)
            logits = fp32_mm(hidden[s0:s1].reshape(-1, width), weight.t(), gemm).view(s1 - s0, rows, -1)
            chunks.append(chunk_logprobs(logits, batch.targets[s0:s1]))
            del logits
        logprobs = torch.cat(chunks)  # [s, b, w]
        for i, index in enumerate(batch.indices):
            seq = sequences[index]
            row, offset = batch.placement(i)
            # Position t predicts token t + 1: the response starts at the model's prompt length.
            start = offset + seq.prompt_len - 1
            results[index] = logprobs[start : start + seq.response_len, row].clone()
        return output.new_zeros(()), {}

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        with head.returning_hidden_states():
            output = model(batch.tokens, batch.positions, None, packed_seq_params=batch.packed_seq_params)
        return output, lambda output: loss_func(batch, output)

    kwargs: dict[str, Any] = {"pg_collection": pg_collection}
    if plan.layout.pp > 1:
        kwargs["p2p_communicator"] = P2PCommunicator(pp_group=pg_collection.pp, config=model.config)
    schedule = get_forward_backward_func(pp_size=plan.layout.pp, vp_size=None)
    with torch.no_grad():
        schedule(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=[model],
            num_microbatches=len(batches),
            seq_length=max(b.tokens.shape[1] for b in batches),
            micro_batch_size=max(b.tokens.shape[0] for b in batches),
            forward_only=True,
            **kwargs,
        )
    if not is_last_stage:
        return []
    assert all(r is not None for r in results), "a sequence was packed into no micro-batch"
    return results  # type: ignore[return-value]
