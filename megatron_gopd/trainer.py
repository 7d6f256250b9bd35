"""The on-policy distillation loop: rollout -> score -> G-OPD advantages -> train -> log.

    cfg = load_config(TrainConfig, "examples/configs/tiny_opd.yaml", overrides)
    Trainer(cfg).run()

Every rank runs the same loop (SPMD). The student lives in Megatron's global parallel state; the
teachers and references live in the `ScoringPool` with their own layouts. Per step:

1. every data-parallel rank draws its slice of the step's prompts (`data.PromptSampler`);
2. the student samples responses in place (`rollout.MegatronRolloutEngine`);
3. the pool scores every response token with the prompt's teacher (and its reference);
4. responses are packed into micro-batches by token count; Megatron's schedule runs forward and
   backward, and the loss takes the student's log-probs from that same forward pass (no extra
   student pass: the rollout batch feeds exactly one optimizer step);
5. the optimizer steps, metrics go to ``metrics.jsonl`` / TensorBoard, and every ``save_every``
   steps a checkpoint is written atomically; a restarted run resumes from the latest one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.distributed as dist

from megatron_gopd import platform
from megatron_gopd.batching import MicroBatch, TrainSample, collate, pack_micro_batches
from megatron_gopd.bridge.safetensors_io import copy_side_files
from megatron_gopd.checkpointing import HF_SUBDIR, atomic_directory_write, read_checkpoint_meta
from megatron_gopd.collectives import agree_on_micro_batch_count
from megatron_gopd.config import dump_yaml, to_dict
from megatron_gopd.data import DataConfig, PromptRecord, build_prompt_sampler, shard_for_rank
from megatron_gopd.logprobs import token_logprobs_from_hidden, token_logprobs_from_logits
from megatron_gopd.loss import (aggregate_loss, gopd_advantages_detailed, loss_normaliser, masked_mean, policy_loss,
                                topk_reverse_kl)
from megatron_gopd.models import ModelArchitecture, ParallelLayout, build_gpt_model
from megatron_gopd.rollout import MegatronRolloutEngine, SamplingParams
from megatron_gopd.scoring import ScoreRequest, ScoringConfig, ScoringPool

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
SFT_RESPONSE_FIELD = "response"
TRAINER_STATE_FILE = "trainer_state.json"


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass
class StudentConfig:
    """The model being trained."""

    checkpoint: str = ""
    """Converted Megatron checkpoint of the initial student (``gopd-convert hf-to-mcore``)."""
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    ep: int = 1
    """Expert-parallel size (MoE students)."""
    dtype: str = "float32"
    """Parameter dtype: float32 on CPU, bfloat16 on GPU."""
    recompute: bool = False
    """Full activation recomputation (on for long responses)."""


@dataclasses.dataclass
class RolloutConfig:
    """How the student samples its training responses (the paper: temperature 1, no truncation)."""

    temperature: float = 1.0
    top_p: float = 1.0
    """Anything below 1 biases the importance weights unless training applies the same mask."""
    top_k: int = 0
    max_new_tokens: int = 256
    n: int = 1
    """Responses per prompt (the paper: 1; outcome rewards are group-normalised over them)."""
    max_batch_size: Optional[int] = None
    """Most samples decoded together; None decodes a rank's whole share at once."""


@dataclasses.dataclass
class LossConfig:
    """The training objective at each sampled response position."""

    kind: Literal["sampled", "topk"] = "sampled"
    """``sampled``: the paper's G-OPD policy gradient, REINFORCE on the sampled token's advantage
    (`megatron_gopd.loss.policy_loss`). ``topk``: the exact reverse KL from the student to the G-OPD
    target q ∝ pi_ref^(1-lam) pi*^lam over the teacher's `topk` most likely tokens plus one bucket
    for the rest (`megatron_gopd.loss.topk_reverse_kl`): the same optimum, no sampling noise in the
    per-position gradient, at the cost of k log-probs per token from the teacher and reference."""
    topk: int = 64
    """k for ``kind: topk``; a value >= the vocabulary size takes the whole vocabulary (then the loss
    is the exact full-vocabulary reverse KL)."""
    agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = "token-mean"
    tis_cap: Optional[float] = 5.0
    """Truncated importance-sampling cap C (the paper: 5); null disables the correction. (The
    ``topk`` loss sums over tokens instead of sampling one, so it applies only to its outcome term.)"""
    clip_eps: Optional[float] = None
    """PPO-style clipping; only meaningful when a batch is reused."""
    logprobs_from_hidden: bool = True
    """Compute the student's log-probs from the final hidden states and the output weight chunk by
    chunk, so full-vocabulary logits never exist (the memory path for long responses and a 152k
    vocabulary); false takes them from GPTModel's logits."""


@dataclasses.dataclass
class OptimConfig:
    """Adam with warmup and an optional cosine decay (Megatron optimizer and scheduler)."""

    lr: float = 1e-5
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay: Literal["constant", "cosine", "linear"] = "constant"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0 (lr={self.lr}, min_lr={self.min_lr})")


@dataclasses.dataclass
class OutcomeRewardConfig:
    """An optional sequence-level verifier reward (megatron_gopd.evaluation)."""

    weight: float = 0.0
    """Weight of the group-normalised outcome advantage added to every token's dense advantage."""
    only: bool = False
    """Train on the outcome reward alone (GRPO-style, how the paper trained its teachers): no
    teachers are needed."""


@dataclasses.dataclass
class TrainConfig:
    """A `gopd-train` job."""

    output_dir: str = "outputs/run"
    """metrics.jsonl, TensorBoard events, checkpoints/ and the final HF export go here."""
    mode: Literal["gopd", "sft"] = "gopd"
    """``gopd``: on-policy distillation (rollouts scored by teachers). ``sft``: the paper's off-policy
    baseline, cross-entropy on teacher-generated responses read from each record's ``response``
    field (no rollouts, no teachers)."""
    seed: int = 1234
    steps: int = 50
    prompts_per_step: int = 1024
    """Prompts per optimizer step over all data-parallel ranks (the paper: 1024)."""
    micro_batch_tokens: int = 8192
    """Micro-batches are packed up to this many (padded) tokens."""
    save_every: int = 10
    """Checkpoint every this many steps (and at the end); 0 only at the end."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept (older ones are deleted once a newer one is complete)."""
    export_hf: bool = True
    """Write the final student as a HF directory (``<output_dir>/hf``)."""
    student: StudentConfig = dataclasses.field(default_factory=StudentConfig)
    scoring: ScoringConfig = dataclasses.field(default_factory=ScoringConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    reward: OutcomeRewardConfig = dataclasses.field(default_factory=OutcomeRewardConfig)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.prompts_per_step < 1 or self.micro_batch_tokens < 2:
            raise ValueError("steps, prompts_per_step must be >= 1 and micro_batch_tokens >= 2")
        if self.loss.kind == "topk" and self.loss.topk < 1:
            raise ValueError(f"loss.topk must be >= 1, got {self.loss.topk}")
        if self.loss.kind == "topk" and (self.mode == "sft" or self.reward.only):
            raise ValueError("loss.kind=topk distils the teachers' distributions: it needs mode=gopd "
                             "with teachers (not mode=sft or reward.only=true)")
        if self.mode == "gopd" and not self.reward.only and not self.scoring.teachers:
            raise ValueError("no teachers configured (scoring.teachers); set reward.only=true to "
                             "train on a verifier reward alone, or mode=sft for the SFT baseline")

    @property
    def needs_teachers(self) -> bool:
        return self.mode == "gopd" and not self.reward.only


def check_train_config(cfg: TrainConfig, world_size: int) -> tuple[ModelArchitecture, ParallelLayout]:
    """Everything about a job that can be checked on one process before any rank starts.

    The student checkpoint, its shapes against the student's layout, the world size, the data
    sources and the whole scoring setup (checkpoints, vocabularies, teacher layouts). Raises
    ValueError / FileNotFoundError with a message naming the problem.
    """
    from megatron_gopd.scoring import validate_scoring_config

    read_checkpoint_meta(cfg.student.checkpoint)
    arch = ModelArchitecture.from_pretrained(Path(cfg.student.checkpoint) / HF_SUBDIR)
    layout = ParallelLayout(tp=cfg.student.tp, pp=cfg.student.pp, ep=cfg.student.ep)
    arch.validate_parallel(layout.tp, layout.pp, layout.ep)
    if world_size % (layout.tp * layout.pp):
        raise ValueError(f"student tp x pp = {layout.tp * layout.pp} does not divide the world size "
                         f"{world_size}")
    dp_size = world_size // (layout.tp * layout.pp)
    if cfg.prompts_per_step % dp_size:
        raise ValueError(f"prompts_per_step={cfg.prompts_per_step} is not divisible by the student's "
                         f"data-parallel size {dp_size}")
    cfg.data.validate()
    if cfg.mode == "sft":
        _check_sft_responses(cfg.data)
    if cfg.needs_teachers:
        validate_scoring_config(cfg.scoring, student_checkpoint=cfg.student.checkpoint,
                                student_layout=layout, world_size=world_size)
        missing = sorted(data_domains(cfg.data) - set(cfg.scoring.routing()))
        if missing:
            raise ValueError(f"prompt domain(s) {missing} have no teacher; the teachers cover "
                             f"{sorted(cfg.scoring.routing())} (set scoring.teachers.<name>.domains)")
    return arch, layout


def _check_sft_responses(data: DataConfig) -> None:
    from megatron_gopd.data import load_records

    for source in data.sources:
        if not source.excluded and SFT_RESPONSE_FIELD not in load_records(source.path, source.split,
                                                                         data.cache_dir).column_names:
            raise ValueError(f"mode=sft trains on teacher responses, but {source.path} has no "
                             f"{SFT_RESPONSE_FIELD!r} field")


def data_domains(data: DataConfig) -> set[str]:
    """Every domain the prompts of `data` route to (reads the files, tokenises nothing)."""
    from megatron_gopd.data import DOMAIN_FIELD, load_records

    domains: set[str] = set()
    for source in data.sources:
        if source.excluded:
            continue
        records = load_records(source.path, source.split, data.cache_dir)
        fallback = source.domain or data.default_domain
        values = records[DOMAIN_FIELD] if DOMAIN_FIELD in records.column_names else []
        domains |= {str(v or fallback) for v in values} or {fallback}
    return domains


# ----------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Builds everything a `TrainConfig` describes and runs its steps; see the module docstring."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self._validate_before_building()

    # ------------------------------------------------------------------ start-up

    def _validate_before_building(self) -> None:
        self.arch, self.layout = check_train_config(self.cfg, dist.get_world_size())
        self.dp_size = dist.get_world_size() // (self.layout.tp * self.layout.pp)

    def setup(self) -> None:
        """Parallel state, student (DDP + optimizer + scheduler), data, scoring pool, rollout engine."""
        from megatron.core import parallel_state
        from transformers import AutoTokenizer

        cfg = self.cfg
        platform.init_model_parallel(tp=self.layout.tp, pp=self.layout.pp, ep=self.layout.ep, seed=cfg.seed)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tokenizer = AutoTokenizer.from_pretrained(Path(cfg.student.checkpoint) / HF_SUBDIR)
        self.sampler = build_prompt_sampler(cfg.data, self.tokenizer)
        self.pool = ScoringPool(cfg.scoring, student_checkpoint=cfg.student.checkpoint,
                                student_layout=self.layout) if cfg.needs_teachers else None
        self._build_student()
        self.engine = MegatronRolloutEngine(self.model.module, self.arch,
                                            eos_token_ids=_eos_ids(self.tokenizer),
                                            max_batch_size=cfg.rollout.max_batch_size) if cfg.mode == "gopd" else None
        self.start_step = self._maybe_resume()
        if dist.get_rank() == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            dump_yaml(cfg, self.output_dir / "config.yaml")

    def _build_student(self) -> None:
        from megatron.core import dist_checkpointing
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        cfg = self.cfg
        module = build_gpt_model(self.arch, self.layout, dtype=cfg.student.dtype, recompute=cfg.student.recompute,
                                 perform_initialization=False, calculate_per_token_loss=True)
        module.load_state_dict(dist_checkpointing.load(module.sharded_state_dict(), cfg.student.checkpoint))
        # Micro-batches are packed by token count, so their shapes differ: pipeline stages must
        # exchange shapes before activations.
        module.config.variable_seq_lengths = self.layout.pp > 1
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.optim.use_distributed_optimizer)
        self.model = DistributedDataParallel(config=module.config, ddp_config=ddp_config, module=module)
        module.config.finalize_model_grads_func = finalize_model_grads
        o = cfg.optim
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                            adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
                            clip_grad=o.clip_grad, bf16=cfg.student.dtype == "bfloat16",
                            fp16=cfg.student.dtype == "float16", params_dtype=module.config.params_dtype,
                            use_distributed_optimizer=o.use_distributed_optimizer),
            [self.model], use_gloo_process_groups=not platform.cpu_mode())
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
            lr_warmup_steps=o.warmup_steps, lr_decay_steps=max(cfg.steps, o.warmup_steps + 1),
            lr_decay_style=o.decay, start_wd=o.weight_decay, end_wd=o.weight_decay,
            wd_incr_steps=cfg.steps, wd_incr_style="constant")

    # ------------------------------------------------------------------ one step

    def train_step(self, step: int) -> dict[str, float]:
        """Run step `step` (0-based) and return its metrics (identical on every rank)."""
        timings: dict[str, float] = {}
        start = time.perf_counter()
        records = shard_for_rank(self.sampler.next_batch(self.cfg.prompts_per_step), self.dp_rank, self.dp_size)
        if self.cfg.mode == "sft":
            return self._sft_step(records)

        self.model.eval()
        with torch.no_grad():
            rollouts = self.engine.generate([r.input_ids for r in records], self._sampling(step))
        timings["time/rollout_s"] = time.perf_counter() - start

        start = time.perf_counter()
        rewards = self._verifier_rewards(records, rollouts)
        samples = self._score(records, rollouts, self._outcome_advantages(rollouts, rewards))
        timings["time/scoring_s"] = time.perf_counter() - start

        start = time.perf_counter()
        self.model.train()
        metrics = self._optimize(samples)
        timings["time/train_s"] = time.perf_counter() - start

        lengths = [len(s) for s in rollouts]
        rewards = [r for r in rewards if r is not None]
        # [tokens, responses, truncated, verifier reward sum, verified responses] over the DP group
        totals = torch.tensor([sum(lengths), len(lengths), sum(s.finish_reason == "length" for s in rollouts),
                               sum(rewards), len(rewards)], dtype=torch.float64)
        longest = torch.tensor([max(lengths, default=0)], dtype=torch.float64)
        _all_reduce_dp(totals, self.dp_group)
        _all_reduce_dp(longest, self.dp_group, op=dist.ReduceOp.MAX)
        total_tokens, count = totals[0].item(), max(totals[1].item(), 1)
        metrics.update({
            "response_length/mean": total_tokens / count,
            "response_length/max": longest.item(),
            "response/truncated_frac": totals[2].item() / count,
            **({"reward/mean": totals[3].item() / max(totals[4].item(), 1)} if self._uses_reward else {}),
            "tokens_per_s": total_tokens / max(sum(timings.values()), 1e-9),
            **timings,
        })
        return metrics

    def _sft_step(self, records: list[PromptRecord]) -> dict[str, float]:
        """Off-policy baseline: cross-entropy on the records' teacher-written responses."""
        start = time.perf_counter()
        samples = []
        for record in records:
            response = self.tokenizer(str(record.extra[SFT_RESPONSE_FIELD]), add_special_tokens=False).input_ids
            response = response + [self.tokenizer.eos_token_id]
            zeros = [0.0] * len(response)
            samples.append(TrainSample(prompt_ids=list(record.input_ids), response_ids=response,
                                       sampler_logprobs=zeros, teacher_logprobs=zeros, ref_logprobs=None,
                                       teacher="sft"))
        self.model.train()
        metrics = self._optimize(samples)
        metrics["time/train_s"] = time.perf_counter() - start
        lengths = torch.tensor([sum(len(s.response_ids) for s in samples), len(samples)], dtype=torch.float64)
        _all_reduce_dp(lengths, self.dp_group)
        metrics["response_length/mean"] = lengths[0].item() / max(lengths[1].item(), 1)
        return metrics

    def _sampling(self, step: int) -> SamplingParams:
        r = self.cfg.rollout
        # A different stream per step and data-parallel replica; reproducible across restarts.
        seed = (self.cfg.seed * 1_000_003 + step * 1009 + self.dp_rank) % (2**31 - 1)
        return SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                              max_new_tokens=r.max_new_tokens, n=r.n, seed=seed)

    def _score(self, records: list[PromptRecord], rollouts, outcome: list[float]) -> list[TrainSample]:
        """Teacher / reference log-probs for every rollout of this rank, with its `outcome` advantage."""
        requests = [ScoreRequest(domain=records[s.prompt_index].domain, prompt_ids=list(records[s.prompt_index].input_ids),
                                 response_ids=list(s.token_ids), messages=records[s.prompt_index].messages)
                    for s in rollouts]
        if self.pool is None:  # outcome reward alone: the "teacher" term is the student's own
            scores = [None] * len(requests)
        else:
            scores = self.pool.score(requests, topk=self._topk)
        samples = []
        for request, rollout, score, adv in zip(requests, rollouts, scores, outcome):
            sampler_logp = rollout.logprobs if rollout.logprobs is not None else rollout.sampler_logprobs
            samples.append(TrainSample(
                prompt_ids=request.prompt_ids, response_ids=request.response_ids,
                sampler_logprobs=list(rollout.sampler_logprobs),
                teacher_logprobs=score.teacher_logprobs.tolist() if score else list(sampler_logp),
                ref_logprobs=score.ref_logprobs.tolist() if score and score.ref_logprobs is not None else None,
                teacher=score.teacher if score else "outcome",
                outcome_advantage=adv,
                teacher_topk_ids=score.teacher_topk_ids if score else None,
                teacher_topk_logprobs=score.teacher_topk_logprobs if score else None,
                ref_topk_logprobs=score.ref_topk_logprobs if score else None))
        return samples

    @property
    def _topk(self) -> int:
        """k of the top-k loss (capped at the vocabulary), 0 for the sampled-token loss."""
        if self.cfg.loss.kind != "topk" or self.cfg.mode != "gopd":
            return 0
        return min(self.cfg.loss.topk, self.arch.vocab_size)

    def _verifier_rewards(self, records: list[PromptRecord], rollouts) -> list[Optional[float]]:
        """Each rollout's verifier reward; None for truncated responses (their answer is incomplete)
        and for every rollout when the job uses no outcome reward."""
        if not self._uses_reward:
            return [None] * len(rollouts)
        from megatron_gopd.evaluation.verifiers import default_registry

        registry = default_registry()
        rewards: list[Optional[float]] = []
        for rollout in rollouts:
            if rollout.finish_reason == "length":
                rewards.append(None)
                continue
            text = self.tokenizer.decode(rollout.token_ids, skip_special_tokens=True)
            rewards.append(registry.score(records[rollout.prompt_index].verifier_fields(), text).reward)
        return rewards

    def _outcome_advantages(self, rollouts, rewards: list[Optional[float]]) -> list[float]:
        """Verifier rewards normalised within each prompt's group of n responses (0 when unused).

        Rollouts without a reward (truncated) are left out of the group statistics and keep only
        their dense reward.
        """
        weight = 1.0 if self.cfg.reward.only else self.cfg.reward.weight
        groups: dict[int, list[float]] = {}
        for rollout, reward in zip(rollouts, rewards):
            if reward is not None:
                groups.setdefault(rollout.prompt_index, []).append(reward)
        out = []
        for rollout, reward in zip(rollouts, rewards):
            group = groups.get(rollout.prompt_index, [])
            if reward is None or len(group) < 2:
                out.append(0.0)
                continue
            mean = sum(group) / len(group)
            std = math.sqrt(sum((g - mean) ** 2 for g in group) / len(group))
            out.append(weight * (reward - mean) / (std + 1e-6))
        return out

    @property
    def _uses_reward(self) -> bool:
        return self.cfg.reward.only or self.cfg.reward.weight != 0.0

    def _optimize(self, samples: list[TrainSample]) -> dict[str, float]:
        """Forward/backward over packed micro-batches and one optimizer step."""
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        groups = pack_micro_batches(samples, self.cfg.micro_batch_tokens)
        count = agree_on_micro_batch_count(len(groups), self.dp_group)
        groups += [[] for _ in range(count - len(groups))]
        pad_id = self.tokenizer.pad_token_id or 0
        micro_batches = [collate(g, pad_id, platform.device(), topk=self._topk) for g in groups]
        collected: list[dict[str, torch.Tensor]] = []
        cfg = self.cfg

        head = _OutputHead(self.model.module) if cfg.loss.logprobs_from_hidden else None

        def loss_func(mb: MicroBatch, output: torch.Tensor):
            # The sampled token, then (top-k loss) the teacher's top-k ids: [b, s] or [b, s, 1 + k].
            targets = mb.targets if mb.topk_ids is None else torch.cat([mb.targets[..., None], mb.topk_ids], -1)
            if head is not None:  # output: the final hidden states [b, s, h]
                logp, entropy = token_logprobs_from_hidden(
                    output.transpose(0, 1), head.weight, targets.transpose(0, 1), tp_group=self.tp_group,
                    vocab_size=self.arch.vocab_size, with_entropy=True)
            else:  # output: vocab-parallel logits [b, s, v/tp]
                logp, entropy = token_logprobs_from_logits(
                    output.transpose(0, 1), targets.transpose(0, 1), tp_group=self.tp_group,
                    vocab_size=self.arch.vocab_size, with_entropy=True)
            logp, entropy = logp.transpose(0, 1), entropy.t()  # [b, s(, 1 + k)], [b, s]
            student_topk = None
            if mb.topk_ids is not None:
                logp, student_topk = logp[..., 0], logp[..., 1:]
            if cfg.mode == "sft":  # cross-entropy on the given responses
                stats, loss_metrics = {}, {}
                loss = aggregate_loss(-logp, mb.loss_mask, cfg.loss.agg, num_tokens=1)
            elif student_topk is not None:
                loss, stats, loss_metrics = self._topk_loss(mb, logp, student_topk)
            else:
                advantages, stats = self._advantages(mb, logp.detach())
                loss, loss_metrics = policy_loss(logp, advantages, mb.loss_mask, sampler_logp=mb.sampler_logprobs,
                                                 tis_cap=cfg.loss.tis_cap, clip_eps=cfg.loss.clip_eps,
                                                 agg=cfg.loss.agg, num_tokens=1)
            tokens = mb.loss_mask.sum()
            stats.update({k: v * tokens for k, v in loss_metrics.items()})
            stats["entropy"] = masked_mean(entropy.detach(), mb.loss_mask) * tokens
            normaliser = loss_normaliser(mb.loss_mask, cfg.loss.agg)
            stats["loss"] = loss.detach()
            stats["_normaliser"] = normaliser
            stats["_tokens"] = tokens
            collected.append(stats)
            normaliser = normaliser.round().to(torch.int)
            return loss, normaliser, {}

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            if head is None:
                output = model(mb.tokens, mb.position_ids, None)
            else:
                with head.returning_hidden_states():
                    output = model(mb.tokens, mb.position_ids, None)
            return output, lambda out: loss_func(mb, out)

        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        seq_length = max(mb.tokens.shape[1] for mb in micro_batches)
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[self.model],
            num_microbatches=len(micro_batches), seq_length=seq_length,
            micro_batch_size=max(mb.tokens.shape[0] for mb in micro_batches), forward_only=False)
        update_ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        metrics = self._reduce_metrics(collected, parallel_state.is_pipeline_last_stage()
                                       and parallel_state.get_tensor_model_parallel_rank() == 0)
        metrics.update({"grad_norm": float(grad_norm or 0.0), "lr": self.optimizer.param_groups[0]["lr"],
                        "update_skipped": float(not update_ok)})
        return metrics

    def _advantages(self, mb: MicroBatch, student_logp: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """G-OPD advantages per teacher group of rows, plus the outcome term; and their metrics."""
        advantages = torch.zeros_like(student_logp)
        stats: dict[str, torch.Tensor] = {}
        for teacher, rows in _rows_by_teacher(mb):
            mask = mb.loss_mask[rows]
            lam, has_ref = self._teacher_lam(teacher)
            if teacher in ("outcome", "sft"):
                continue
            detail = gopd_advantages_detailed(student_logp[rows], mb.teacher_logprobs[rows],
                                              mb.ref_logprobs[rows] if has_ref else None, lam)
            advantages[rows] = detail.advantages
            tokens = mask.sum()
            stats[f"reverse_kl/{teacher}"] = masked_mean(detail.reverse_kl, mask) * tokens
            stats[f"_tokens/{teacher}"] = tokens
            if detail.implicit_reward is not None:
                stats[f"implicit_reward/{teacher}"] = masked_mean(detail.implicit_reward, mask) * tokens
            stats["teacher_clamped"] = stats.get("teacher_clamped", 0) + (detail.teacher_clamped & mask.bool()).sum()
        advantages = advantages + mb.outcome_advantage
        return advantages * mb.loss_mask, stats

    def _topk_loss(self, mb: MicroBatch, logp: torch.Tensor,
                   student_topk: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
        """Top-k reverse KL to each row's G-OPD target, plus the policy-gradient outcome term.

        Returns (loss, stats, loss metrics). The sampled-token advantages are still computed for
        their metrics (reverse KL to the teacher, implicit reward), not for the gradient.
        """
        cfg = self.cfg.loss
        _, stats = self._advantages(mb, logp.detach())
        target_kl = torch.zeros_like(logp)  # [b, s]
        for teacher, rows in _rows_by_teacher(mb):
            lam, has_ref = self._teacher_lam(teacher)
            target_kl[rows] = topk_reverse_kl(student_topk[rows], mb.teacher_topk_logprobs[rows],
                                              mb.ref_topk_logprobs[rows] if has_ref else None, lam)
            mask = mb.loss_mask[rows]
            stats[f"target_kl/{teacher}"] = masked_mean(target_kl[rows].detach(), mask) * mask.sum()
        loss = aggregate_loss(target_kl, mb.loss_mask, cfg.agg, num_tokens=1)
        loss_metrics: dict[str, torch.Tensor] = {}
        if self._uses_reward:  # the verifier's group-normalised reward, by policy gradient
            outcome = mb.outcome_advantage * mb.loss_mask
            outcome_loss, loss_metrics = policy_loss(logp, outcome, mb.loss_mask, sampler_logp=mb.sampler_logprobs,
                                                     tis_cap=cfg.tis_cap, clip_eps=cfg.clip_eps, agg=cfg.agg,
                                                     num_tokens=1)
            loss = loss + outcome_loss
        return loss, stats, loss_metrics

    def _teacher_lam(self, teacher: str) -> tuple[float, bool]:
        if teacher in ("outcome", "sft") or self.pool is None:
            return 1.0, False
        t = self.cfg.scoring.teachers[teacher]
        return t.lam, t.scored_reference is not None

    def _reduce_metrics(self, collected: list[dict], contributes: bool) -> dict[str, float]:
        """Token-weighted means over every micro-batch of every data-parallel rank.

        Only one rank per data-parallel replica (last pipeline stage, TP rank 0) contributes; the
        sums are all-reduced over the world so that every rank (rank 0 writes) has them.
        """
        names = self._metric_names()
        totals = torch.zeros(2, len(names), dtype=torch.float64)  # [sum, how many micro-batches had it]
        if contributes:
            for stats in collected:
                for i, name in enumerate(names):
                    if name in stats:
                        totals[0, i] += float(stats[name])
                        totals[1, i] += 1
        if dist.is_initialized():
            dist.all_reduce(totals)
        sums = {name: total for name, total, seen in zip(names, *totals.tolist()) if seen or name.startswith("_")}
        tokens = max(sums.pop("_tokens"), 1.0)
        # the step's loss as the optimizer saw it: summed micro-batch losses / the global normaliser
        out: dict[str, float] = {"loss": sums.pop("loss", 0.0) / max(sums.pop("_normaliser"), 1.0),
                                 "teacher_clamped": sums.pop("teacher_clamped", 0.0)}
        for name, value in sums.items():
            if name.startswith("_tokens/"):
                continue
            teacher = name.split("/", 1)[1] if "/" in name else None
            denominator = sums.get(f"_tokens/{teacher}", 0.0) if teacher else tokens
            if teacher and denominator == 0:
                continue  # this teacher's domain drew no prompts this step
            out[name] = value / max(denominator, 1.0)
        return out

    def _metric_names(self) -> list[str]:
        names = ["_tokens", "_normaliser", "loss", "teacher_clamped", "entropy", "advantage_mean", "is_weight_mean",
                 "is_truncated_frac", "sampler_logp_abs_diff", "clip_frac", "ratio_mean"]
        for teacher in sorted(self.cfg.scoring.teachers) if self.pool is not None else []:
            names += [f"reverse_kl/{teacher}", f"implicit_reward/{teacher}", f"target_kl/{teacher}",
                      f"_tokens/{teacher}"]
        return names

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        """Set up, resume if a checkpoint exists, train to `steps`, checkpoint, export.

        SIGUSR1 or SIGTERM (a scheduler's warning before a time limit or preemption) makes the run
        checkpoint after the current step and return; started again, it resumes from there.
        """
        self.setup()
        self._install_stop_signals()
        cfg = self.cfg
        rank0 = dist.get_rank() == 0
        writer = _MetricsWriter(self.output_dir, enabled=rank0, resume_step=self.start_step)
        progress = _progress(cfg.steps, self.start_step, enabled=rank0)
        for step in range(self.start_step, cfg.steps):
            metrics = {"step": step + 1, **self.train_step(step)}
            writer.write(metrics)
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", kl=_first(metrics, "reverse_kl/"))
            done = step + 1 == cfg.steps
            stop = self._stop_agreed()
            if done or stop or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                self.save_checkpoint(step + 1)
            if stop and not done:
                logger.warning("stop signal received: checkpointed step %d and stopping; run the same "
                               "command again to resume", step + 1)
                progress.close()
                writer.close()
                return
        progress.close()
        writer.close()
        if cfg.export_hf:
            self.export_hf()

    def _install_stop_signals(self) -> None:
        import signal
        import threading

        self._stop_requested = False
        if threading.current_thread() is not threading.main_thread():
            return

        def request_stop(signum, frame) -> None:
            self._stop_requested = True

        for signum in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(signum, request_stop)

    def _stop_agreed(self) -> bool:
        """True on every rank when any rank was asked to stop (the checkpoint is collective)."""
        flag = torch.tensor([float(getattr(self, "_stop_requested", False))])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # ------------------------------------------------------------------ checkpoints

    def _sharded_state_dict(self, is_loading: bool = False) -> dict:
        model_sd = self.model.module.sharded_state_dict()
        # dp_reshardable: every rank writes its own optimizer shard, no gathers; a resume may change
        # the data-parallel size but not TP/PP (the model part of the checkpoint reshards freely).
        optimizer_sd = self.optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "dp_reshardable"})
        return {"model": model_sd, "optimizer": optimizer_sd}

    def save_checkpoint(self, step: int) -> Path:
        """Model, optimizer, scheduler, every rank's RNG and the data position, written atomically."""
        from megatron.core import dist_checkpointing

        target = self.checkpoint_dir / f"{CHECKPOINT_PREFIX}{step:06d}"
        if target.exists():
            return target
        adam_step = self._adam_step()
        rng_state = {"torch": torch.get_rng_state(), "python": __import__("random").getstate()}
        rng_states = [None] * dist.get_world_size()
        dist.all_gather_object(rng_states, rng_state)

        def write(tmp: Path) -> None:
            dist_checkpointing.save(self._sharded_state_dict(), str(tmp))
            if dist.get_rank() == 0:
                meta = json.loads((Path(self.cfg.student.checkpoint) / "gopd_checkpoint.json").read_text())
                meta.update(dtype=self.cfg.student.dtype, trained_steps=step,
                            saved_layout=dataclasses.asdict(self.layout))
                (tmp / "gopd_checkpoint.json").write_text(json.dumps(meta, indent=2))
                (tmp / HF_SUBDIR).mkdir()
                copy_side_files(Path(self.cfg.student.checkpoint) / HF_SUBDIR, tmp / HF_SUBDIR)
                state = {"step": step, "scheduler": self.scheduler.state_dict(),
                         "data": self.sampler.state_dict(), "adam_step": adam_step}
                (tmp / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2))
                torch.save(rng_states, tmp / "rng_states.pt")
            dist.barrier()

        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        out = atomic_directory_write(target, write)
        logger.info("saved checkpoint %s", out)
        if dist.get_rank() == 0:
            self._prune_checkpoints()
        return out

    def _torch_adam_states(self) -> list[dict]:
        return [state for optimizer in getattr(self.optimizer, "chained_optimizers", [self.optimizer])
                for state in optimizer.optimizer.state.values()]

    def _adam_step(self) -> Optional[float]:
        """torch Adam's update count (None with apex / TE optimizers, which keep it elsewhere)."""
        steps = {float(s["step"]) for s in self._torch_adam_states() if torch.is_tensor(s.get("step"))}
        return max(steps) if steps else None

    def _set_adam_step(self, step: Optional[float]) -> None:
        """Restore torch Adam's per-parameter update count after loading a checkpoint.

        megatron-core 0.16's distributed optimizer does not bring torch Adam's ``step`` back from
        a ``dp_reshardable`` checkpoint (it comes back as the freshly initialised 0), and where it
        does restore it, it shares one tensor between all parameters, which torch then advances
        once per parameter. Either corrupts Adam's bias correction on the first update after a
        resume, so the count is saved by the trainer and put back here, one tensor per parameter.
        """
        if step is None:
            return
        for state in self._torch_adam_states():
            if "step" in state:
                state["step"] = torch.tensor(float(step))

    def _prune_checkpoints(self) -> None:
        import shutil

        complete = sorted(p for p in self.checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())
        for old in complete[: max(len(complete) - self.cfg.keep_checkpoints, 0)]:
            shutil.rmtree(old, ignore_errors=True)

    def latest_checkpoint(self) -> Optional[Path]:
        """The newest complete checkpoint (temporary directories of interrupted saves are ignored)."""
        if not self.checkpoint_dir.is_dir():
            return None
        complete = sorted(p for p in self.checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*")
                          if p.is_dir() and (p / TRAINER_STATE_FILE).is_file())
        return complete[-1] if complete else None

    def _maybe_resume(self) -> int:
        from megatron.core import dist_checkpointing

        latest = self.latest_checkpoint()
        if latest is None:
            return 0
        # The optimizer's state tensors must exist before a checkpoint can be loaded into them.
        for optimizer in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            optimizer.init_state_fn(optimizer.optimizer, optimizer.config)
            # torch's Adam (used when neither apex nor TE is installed) also keeps a per-parameter
            # 'step', which Megatron's distributed optimizer reads when building its state dict.
            for state in optimizer.optimizer.state.values():
                state.setdefault("step", torch.tensor(0.0))
        state = dist_checkpointing.load(self._sharded_state_dict(is_loading=True), str(latest))
        self.model.module.load_state_dict(state["model"])
        with torch.no_grad():  # the optimizer copies into its fp32 main parameters in place
            self.optimizer.load_state_dict(state["optimizer"])
        trainer_state = json.loads((latest / TRAINER_STATE_FILE).read_text())
        self._set_adam_step(trainer_state["adam_step"])
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        self.sampler.load_state_dict(trainer_state["data"])
        rng = torch.load(latest / "rng_states.pt", weights_only=False)[dist.get_rank()]
        torch.set_rng_state(rng["torch"])
        __import__("random").setstate(rng["python"])
        logger.info("resumed from %s (step %d)", latest, trainer_state["step"])
        return int(trainer_state["step"])

    def export_hf(self) -> None:
        """The trained student as a HF directory under ``<output_dir>/hf`` (streamed, atomic;
        a previous export is replaced only once the new one is complete)."""
        from megatron_gopd.bridge.convert import write_hf_directory

        out = self.output_dir / "hf"
        write_hf_directory(self.model.module, self.arch, out, Path(self.cfg.student.checkpoint) / HF_SUBDIR,
                           replace=True)
        logger.info("exported the student to %s", out)

    def close(self) -> None:
        if getattr(self, "pool", None) is not None:
            self.pool.close()


# ----------------------------------------------------------------------------------------------
# Helpers


class _OutputHead:
    """Lets GPTModel return its final hidden states instead of logits, and keeps the head's weight.

    Within `returning_hidden_states()` the output layer passes its input through (gathered over
    the sequence under sequence parallelism) and records the weight it would have used (the
    embedding when tied), so the loss can compute log-probs chunk by chunk from both
    (`token_logprobs_from_hidden`). Only the last pipeline stage has an output layer.
    """

    def __init__(self, model) -> None:
        self.layer = getattr(model, "output_layer", None)
        self.weight: Optional[torch.Tensor] = None

    def returning_hidden_states(self):
        import contextlib

        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        layer = self.layer

        @contextlib.contextmanager
        def patched():
            if layer is None:
                yield
                return

            def pass_through(hidden, weight=None, runtime_gather_output=None):
                self.weight = layer.weight if weight is None else weight
                if layer.sequence_parallel:
                    # The log-prob kernel all-reduces the hidden gradient over TP itself, so the
                    # gather's backward must only split it (not reduce-scatter it again).
                    hidden = gather_from_sequence_parallel_region(
                        hidden, tensor_parallel_output_grad=False, group=layer.tp_group)
                return hidden, None

            layer.forward = pass_through
            try:
                yield
            finally:
                del layer.forward  # back to the class's forward
        return patched()



def _rows_by_teacher(mb: MicroBatch) -> list[tuple[str, torch.Tensor]]:
    """(teacher, boolean row mask [b]) for each teacher with samples in `mb`, in name order."""
    device = mb.loss_mask.device
    return [(teacher, torch.tensor([t == teacher for t in mb.teachers], device=device))
            for teacher in sorted(set(mb.teachers))]


def _eos_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    return sorted(i for i in ids if i is not None)


def _all_reduce_dp(tensor: torch.Tensor, group, op=dist.ReduceOp.SUM) -> None:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)


def _first(metrics: dict[str, float], prefix: str) -> str:
    values = [v for k, v in metrics.items() if k.startswith(prefix)]
    return f"{values[0]:.4f}" if values else "-"


class _MetricsWriter:
    """One JSON object per step in ``metrics.jsonl`` (plus TensorBoard when installed), rank 0 only.

    On resume the lines of steps after the checkpoint (written before a crash) are dropped, so the
    file always describes one consistent run.
    """

    def __init__(self, output_dir: Path, enabled: bool, resume_step: int) -> None:
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output_dir / "tensorboard"))
        except ImportError:
            logger.info("tensorboard is not installed; metrics go to metrics.jsonl only")

    def write(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        if self.tb is not None:
            for name, value in metrics.items():
                if name != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(name, value, metrics["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="gopd-train", unit="step",
                dynamic_ncols=True)
