"""The on-policy distillation loop: rollout -> score -> G-OPD advantages -> train -> log.

    cfg = load_config(TrainConfig, "examples/configs/tiny_opd.yaml", overrides)
    Trainer(cfg).run()

Every rank runs the same loop (SPMD). The student lives in Megatron's global parallel state; the
teachers and references live in the `ScoringPool` with their own layouts. Per step:

1. every data-parallel rank draws its slice of the step's prompts (`data.PromptSampler`);
2. the student samples responses: in place (`rollout.MegatronRolloutEngine`), or with vLLM
   (`rollout.VLLMRolloutEngine`, ``rollout.engine=vllm``) after its weights are synced;
3. the pool scores every response token with the prompt's teacher (and its reference);
4. responses are packed into micro-batches by token count; Megatron's schedule runs forward and
   backward, and the loss (`TrainObjective`) takes the student's log-probs from that same forward
   pass (no extra student pass: the rollout batch feeds exactly one optimizer step);
5. the optimizer steps, metrics go to ``metrics.jsonl`` / TensorBoard, and every ``save_every``
   steps a checkpoint is written atomically; a restarted run resumes from the latest one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_gopd import platform
from megatron_gopd.batching import MicroBatch, TrainSample, collate, pack_micro_batches
from megatron_gopd.checkpointing import HF_SUBDIR, load_model, read_checkpoint_meta
from megatron_gopd.collectives import agree_on_micro_batch_count, all_reduce_dp
from megatron_gopd.config import dump_yaml
from megatron_gopd.data import PromptRecord, build_prompt_sampler, end_of_response_ids, shard_for_rank
from megatron_gopd.logprobs import token_logprobs_from_hidden, token_logprobs_from_logits
from megatron_gopd.models.attention import require_packing_support
from megatron_gopd.models.output_head import OutputHead
from megatron_gopd.planner import GB, unique_storage_bytes
from megatron_gopd.process import latch_stop_signals, stop_requested
from megatron_gopd.rollout import RolloutBatch, RolloutEngine, SamplingParams, VLLMRolloutEngine, build_rollout_engine
from megatron_gopd.scoring import ScoreRequest, ScoringPool
from megatron_gopd.trainer.checkpoint import TrainCheckpointer
from megatron_gopd.trainer.config import (
    SFT_RESPONSE_FIELD,
    TrainConfig,
    TrainPlan,
    check_train_config,
    prompt_length_limit,
)
from megatron_gopd.trainer.metrics import (
    MetricSums,
    MetricsWriter,
    first_with_prefix,
    progress_bar,
    reduce_step_metrics,
)
from megatron_gopd.trainer.objective import TrainObjective
from megatron_gopd.trainer.rewards import group_normalised_advantages, verifier_rewards

logger = logging.getLogger(__name__)


class Trainer:
    """Builds everything a `TrainConfig` describes and runs its steps; see the module docstring."""

    def __init__(self, cfg: TrainConfig, plan: Optional[TrainPlan] = None) -> None:
        """`plan`: what `check_train_config` resolved for this job (checked against it); None checks
        the config here."""
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        if plan is None:
            plan = check_train_config(cfg, dist.get_world_size())
        else:
            plan.check_matches(cfg, dist.get_world_size())
        self.plan = plan
        self.arch, self.layout = plan.arch, plan.layout
        self.dp_size = dist.get_world_size() // (self.layout.tp * self.layout.pp)
        self.objective = TrainObjective(cfg.loss, cfg.mode, uses_reward=self._uses_reward)

    # ------------------------------------------------------------------ start-up

    def setup(self) -> None:
        """Parallel state, student (DDP + optimizer + scheduler), data, scoring pool, rollout engine."""
        cfg = self.cfg
        self.init_parallel_state()
        data = dataclasses.replace(cfg.data, max_prompt_length=prompt_length_limit(cfg, self.arch))
        self.sampler = build_prompt_sampler(data, self.tokenizer)
        self.pool = (
            ScoringPool(
                cfg.scoring,
                student_checkpoint=cfg.student.checkpoint,
                student_layout=self.layout,
                plan=self.plan.scoring,
            )
            if cfg.needs_teachers
            else None
        )
        self._build_student()
        self.engine = self._build_engine() if cfg.mode == "gopd" else None
        student_meta = read_checkpoint_meta(cfg.student.checkpoint)
        self.checkpointer = TrainCheckpointer(
            self.checkpoint_dir,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            sampler=self.sampler,
            student_checkpoint=cfg.student.checkpoint,
            keep=cfg.keep_checkpoints,
            meta={
                **student_meta,
                "dtype": cfg.student.dtype,
                "saved_layout": {"tp": self.layout.tp, "pp": self.layout.pp, "ep": self.layout.ep},
            },
        )
        if dist.get_rank() == 0:
            self.checkpointer.remove_interrupted_saves(self.output_dir)
        dist.barrier()
        self.start_step = self.checkpointer.resume()
        self.static_gb: Optional[float] = None  # measured after the first update (Adam's states exist then)
        if dist.get_rank() == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            dump_yaml(cfg, self.output_dir / "config.yaml")

    def init_parallel_state(self) -> None:
        """Megatron's parallel state for the student's layout, this rank's groups and the tokenizer
        (collective): the first part of `setup`, and all a bare `_build_student` needs before it."""
        from megatron.core import parallel_state
        from transformers import AutoTokenizer

        platform.init_model_parallel(tp=self.layout.tp, pp=self.layout.pp, ep=self.layout.ep, seed=self.cfg.seed)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tokenizer = AutoTokenizer.from_pretrained(Path(self.cfg.student.checkpoint) / HF_SUBDIR)
        self.eos_token_ids = end_of_response_ids(self.tokenizer, Path(self.cfg.student.checkpoint) / HF_SUBDIR)

    def _build_engine(self) -> RolloutEngine:
        """The rollout engine `rollout.engine` names, over this rank's student."""
        r, prompt = self.cfg.rollout, self.cfg.data.max_prompt_length
        # The longest sample the job can produce: engines size their caches (vLLM its max_model_len)
        # for it instead of the model's whole context.
        longest = min(prompt + r.max_new_tokens, self.arch.max_position_embeddings) if prompt else None
        if r.engine == "vllm":
            return VLLMRolloutEngine(
                self.model.module,
                self.arch,
                Path(self.cfg.student.checkpoint) / HF_SUBDIR,
                eos_token_ids=self.eos_token_ids,
                max_sequence_length=longest,
                max_batch_size=r.max_batch_size,
                kv_cache_gb=r.kv_cache_gb,
                gpu_memory_utilization=r.vllm_gpu_memory_utilization,
                enforce_eager=r.vllm_enforce_eager,
                sleep_between_steps=r.vllm_sleep_between_steps,
                seed=self.cfg.seed,
            )
        return build_rollout_engine(
            r.engine,
            self.model.module,
            self.arch,
            eos_token_ids=self.eos_token_ids,
            layout=self.layout,
            max_sequence_length=longest,
            kv_cache_gb=r.kv_cache_gb,
            kv_cache_memory_fraction=r.kv_cache_fraction,
            max_batch_size=r.max_batch_size,
        )

    def _build_student(self) -> None:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        cfg = self.cfg
        module, _ = load_model(
            cfg.student.checkpoint,
            self.layout,
            dtype=cfg.student.dtype,
            recompute=cfg.student.recompute,
            calculate_per_token_loss=True,
            attention=cfg.student.attention,
        )
        if self.plan.packed:
            require_packing_support(module)
        # Micro-batches are packed by token count, so their shapes differ (packed: [t, 1, h] with
        # t varying): pipeline stages must exchange shapes before activations.
        module.config.variable_seq_lengths = self.layout.pp > 1
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.optim.use_distributed_optimizer,
        )
        self.model = DistributedDataParallel(config=module.config, ddp_config=ddp_config, module=module)
        module.config.finalize_model_grads_func = finalize_model_grads
        o = cfg.optim
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=o.lr,
                min_lr=o.min_lr,
                weight_decay=o.weight_decay,
                adam_beta1=o.adam_beta1,
                adam_beta2=o.adam_beta2,
                adam_eps=o.adam_eps,
                clip_grad=o.clip_grad,
                bf16=cfg.student.dtype == "bfloat16",
                fp16=cfg.student.dtype == "float16",
                params_dtype=module.config.params_dtype,
                use_distributed_optimizer=o.use_distributed_optimizer,
            ),
            [self.model],
            use_gloo_process_groups=not platform.cpu_mode(),
        )
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if o.warmup_steps else o.lr,
            max_lr=o.lr,
            min_lr=o.min_lr,
            lr_warmup_steps=o.warmup_steps,
            lr_decay_steps=max(cfg.steps, o.warmup_steps + 1),
            lr_decay_style=o.decay,
            start_wd=o.weight_decay,
            end_wd=o.weight_decay,
            wd_incr_steps=cfg.steps,
            wd_incr_style="constant",
        )

    def _static_memory_gb(self) -> float:
        """The most any rank holds in parameters, gradient buffers, optimizer states and pool models
        (GB): the static state of `gopd-train --plan`, measured."""
        tensors = list(self.model.module.parameters())
        tensors += [getattr(p, "main_grad", None) for p in self.model.module.parameters()]
        for optimizer in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            tensors += [p for group in optimizer.optimizer.param_groups for p in group["params"]]
            tensors += [
                v
                for state in optimizer.optimizer.state.values()
                for v in state.values()
                if torch.is_tensor(v) and v.dim() > 0
            ]
        if self.pool is not None:
            tensors += self.pool.parameter_tensors()
        largest = torch.tensor([unique_storage_bytes(tensors) / GB], dtype=torch.float64)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        return largest.item()

    # ------------------------------------------------------------------ one step

    def train_step(self, step: int) -> dict[str, float]:
        """Run step `step` (0-based) and return its metrics (identical on every rank)."""
        timings: dict[str, float] = {}
        start = time.perf_counter()
        records = shard_for_rank(self.sampler.next_batch(self.cfg.prompts_per_step), self.dp_rank, self.dp_size)
        if self.cfg.mode == "sft":
            return self._sft_step(records)

        self.model.eval()
        if self.engine.holds_weight_copy:  # the engine samples from its own copy: bring it up to date
            sync_start = time.perf_counter()
            self.engine.sync_weights()
            timings["time/weight_sync_s"] = time.perf_counter() - sync_start
        with torch.no_grad():
            rollouts = self.engine.generate([r.input_ids for r in records], self._sampling(step))
        self.engine.release()  # the KV cache's memory goes back before scoring and training
        timings["time/rollout_s"] = time.perf_counter() - start - timings.get("time/weight_sync_s", 0.0)

        start = time.perf_counter()
        rewards = (
            verifier_rewards(records, rollouts, self.tokenizer, truncated=self.cfg.reward.truncated)
            if self._uses_reward
            else [None] * len(rollouts)
        )
        outcome = group_normalised_advantages(
            [r.prompt_index for r in rollouts], rewards, 1.0 if self.cfg.reward.only else self.cfg.reward.weight
        )
        samples = self._score(records, rollouts, outcome)
        timings["time/scoring_s"] = time.perf_counter() - start

        start = time.perf_counter()
        self.model.train()
        metrics = self._optimize(samples)
        timings["time/train_s"] = time.perf_counter() - start
        rollout_metrics, response_tokens = self._rollout_metrics(rollouts, rewards)
        metrics.update(rollout_metrics)
        metrics["tokens_per_s"] = response_tokens / max(sum(timings.values()), 1e-9)
        metrics.update(timings)
        return metrics

    def _rollout_metrics(
        self, rollouts: RolloutBatch, rewards: list[Optional[float]]
    ) -> tuple[dict[str, float], float]:
        """(response lengths, truncation and verifier reward; total response tokens), over the
        data-parallel group."""
        lengths = [len(s) for s in rollouts]
        scored = [r for r in rewards if r is not None]
        # [tokens, responses, truncated, verifier reward sum, verified responses] over the DP group
        totals = torch.tensor(
            [sum(lengths), len(lengths), sum(s.finish_reason == "length" for s in rollouts), sum(scored), len(scored)],
            dtype=torch.float64,
        )
        longest = torch.tensor([max(lengths, default=0)], dtype=torch.float64)
        all_reduce_dp(totals, self.dp_group)
        all_reduce_dp(longest, self.dp_group, op=dist.ReduceOp.MAX)
        count = max(totals[1].item(), 1)
        out = {
            "response_length/mean": totals[0].item() / count,
            "response_length/max": longest.item(),
            "response/truncated_frac": totals[2].item() / count,
        }
        if self._uses_reward:
            out["reward/mean"] = totals[3].item() / max(totals[4].item(), 1)
        return out, totals[0].item()

    def _sft_step(self, records: list[PromptRecord]) -> dict[str, float]:
        """Off-policy baseline: cross-entropy on the records' teacher-written responses."""
        start = time.perf_counter()
        samples = []
        for record in records:
            response = self.tokenizer(str(record.extra[SFT_RESPONSE_FIELD]), add_special_tokens=False).input_ids
            response = response + [self.tokenizer.eos_token_id]
            zeros = [0.0] * len(response)
            samples.append(
                TrainSample(
                    prompt_ids=list(record.input_ids),
                    response_ids=response,
                    sampler_logprobs=zeros,
                    teacher_logprobs=zeros,
                    ref_logprobs=None,
                    teacher=None,
                )
            )
        self.model.train()
        metrics = self._optimize(samples)
        metrics["time/train_s"] = time.perf_counter() - start
        lengths = torch.tensor([sum(len(s.response_ids) for s in samples), len(samples)], dtype=torch.float64)
        all_reduce_dp(lengths, self.dp_group)
        metrics["response_length/mean"] = lengths[0].item() / max(lengths[1].item(), 1)
        return metrics

    def _sampling(self, step: int) -> SamplingParams:
        r = self.cfg.rollout
        # A different stream per step and data-parallel replica; reproducible across restarts.
        seed = (self.cfg.seed * 1_000_003 + step * 1009 + self.dp_rank) % (2**31 - 1)
        return SamplingParams(
            temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens, n=r.n, seed=seed
        )

    def _score(self, records: list[PromptRecord], rollouts: RolloutBatch, outcome: list[float]) -> list[TrainSample]:
        """Teacher / reference log-probs for every rollout of this rank, with its `outcome` advantage."""
        requests = [
            ScoreRequest(
                domain=records[s.prompt_index].domain,
                prompt_ids=list(records[s.prompt_index].input_ids),
                response_ids=list(s.token_ids),
                messages=records[s.prompt_index].messages,
            )
            for s in rollouts
        ]
        scores = self.pool.score(requests, topk=self._topk) if self.pool is not None else [None] * len(requests)
        samples = []
        for request, rollout, score, adv in zip(requests, rollouts, scores, outcome):
            sampler_logp = rollout.logprobs if rollout.logprobs is not None else rollout.sampler_logprobs
            if score is None:  # outcome reward alone: no teacher, no dense reward
                samples.append(
                    TrainSample(
                        prompt_ids=request.prompt_ids,
                        response_ids=request.response_ids,
                        sampler_logprobs=rollout.sampler_logprobs,
                        teacher_logprobs=sampler_logp,
                        ref_logprobs=None,
                        teacher=None,
                        outcome_advantage=adv,
                    )
                )
                continue
            samples.append(
                TrainSample(
                    prompt_ids=request.prompt_ids,
                    response_ids=request.response_ids,
                    sampler_logprobs=rollout.sampler_logprobs,
                    teacher_logprobs=score.teacher_logprobs,
                    ref_logprobs=score.ref_logprobs,
                    teacher=score.teacher,
                    lam=score.lam,
                    outcome_advantage=adv,
                    teacher_topk_ids=score.teacher_topk_ids,
                    teacher_topk_logprobs=score.teacher_topk_logprobs,
                    ref_topk_logprobs=score.ref_topk_logprobs,
                )
            )
        return samples

    @property
    def _topk(self) -> int:
        """k of the top-k loss (capped at the vocabulary), 0 for the sampled-token loss."""
        if self.cfg.loss.kind != "topk" or self.cfg.mode != "gopd":
            return 0
        return min(self.cfg.loss.topk, self.arch.vocab_size)

    @property
    def _uses_reward(self) -> bool:
        return self.cfg.reward.only or self.cfg.reward.weight != 0.0

    def _optimize(self, samples: list[TrainSample]) -> dict[str, float]:
        """Forward/backward over packed micro-batches and one optimizer step."""
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        packed = self.plan.packed
        # Sequence parallelism splits the (packed) sequence dimension over the TP ranks.
        multiple = self.layout.tp if self.model.module.config.sequence_parallel else 1
        groups = pack_micro_batches(samples, self.cfg.micro_batch_tokens, multiple, packed)
        count = agree_on_micro_batch_count(len(groups), self.dp_group)
        groups += [[] for _ in range(count - len(groups))]
        pad_id = self.tokenizer.pad_token_id or 0
        micro_batches = [
            collate(g, pad_id, platform.device(), topk=self._topk, multiple=multiple, packed=packed) for g in groups
        ]
        collected: list[MetricSums] = []
        head = OutputHead(self.model.module) if self.cfg.loss.logprobs_from_hidden else None

        def loss_func(mb: MicroBatch, output: torch.Tensor):
            logp, entropy, student_topk = self._student_logprobs(mb, output, head)
            loss, normaliser, metrics = self.objective(mb, logp, entropy, student_topk)
            collected.append(metrics)
            return loss, normaliser.round().to(torch.int), {}

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            # Packed: the model reads one [1, t] row, each sequence attending only to itself.
            inputs = mb if mb.packed is None else mb.packed
            kwargs = {} if mb.packed is None else {"packed_seq_params": mb.packed.packed_seq_params}
            if head is None:
                output = model(inputs.tokens, inputs.position_ids, None, **kwargs)
            else:
                with head.returning_hidden_states():
                    output = model(inputs.tokens, inputs.position_ids, None, **kwargs)
            return output, lambda out: loss_func(mb, out)

        model_inputs = [mb.tokens if mb.packed is None else mb.packed.tokens for mb in micro_batches]
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=[self.model],
            num_microbatches=len(micro_batches),
            seq_length=max(t.shape[1] for t in model_inputs),
            micro_batch_size=max(t.shape[0] for t in model_inputs),
            forward_only=False,
        )
        update_ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        if self.static_gb is None:
            self.static_gb = self._static_memory_gb()
        contributes = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
        metrics = reduce_step_metrics(collected, contributes)
        metrics.update(
            {
                "grad_norm": float(grad_norm or 0.0),
                "lr": self.optimizer.param_groups[0]["lr"],
                "update_skipped": float(not update_ok),
                "memory/static_gb": self.static_gb,
            }
        )
        if torch.cuda.is_available() and not platform.cpu_mode():
            metrics["memory/peak_gb"] = torch.cuda.max_memory_allocated() / GB
        return metrics

    def _student_logprobs(
        self, mb: MicroBatch, output: torch.Tensor, head: Optional[OutputHead]
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The student's log-probs of the targets ``[b, s]``, entropy ``[b, s]`` and (top-k loss)
        log-probs of the teacher's top-k ids ``[b, s, k]``, from the last stage's output.

        A packed micro-batch's output is ``[1, t, ...]``: the targets are packed the same way
        (each position's next token within its own sequence), and the results are scattered back
        to the ``[b, s]`` rows (differentiably) so that the objective sees the padded layout.
        """
        # The sampled token, then (top-k loss) the teacher's top-k ids: [b, s] or [b, s, 1 + k].
        targets = mb.targets if mb.topk_ids is None else torch.cat([mb.targets[..., None], mb.topk_ids], -1)
        if mb.packed is not None:
            targets = mb.packed.gather_padded(targets)  # [1, t(, 1 + k)]
        if head is not None:  # output: the final hidden states [b, s, h] ([1, t, h] packed)
            logp, entropy = token_logprobs_from_hidden(
                output.transpose(0, 1),
                head.weight,
                targets.transpose(0, 1),
                tp_group=self.tp_group,
                vocab_size=self.arch.vocab_size,
                with_entropy=True,
            )
        else:  # output: vocab-parallel logits [b, s, v/tp]
            logp, entropy = token_logprobs_from_logits(
                output.transpose(0, 1),
                targets.transpose(0, 1),
                tp_group=self.tp_group,
                vocab_size=self.arch.vocab_size,
                with_entropy=True,
            )
        logp, entropy = logp.transpose(0, 1), entropy.t()  # [b, s(, 1 + k)], [b, s]
        if mb.packed is not None:  # [1, t, ...] -> [b, s, ...]; positions past a row's end hold
            # finite placeholders (masked out): 0, and uniform log-probs for the top-k ids
            length = mb.tokens.shape[1]
            entropy = mb.packed.scatter_padded(entropy, length)
            if mb.topk_ids is None:
                return mb.packed.scatter_padded(logp, length), entropy, None
            k = mb.topk_ids.shape[-1]
            sampled = mb.packed.scatter_padded(logp[..., 0], length)
            return sampled, entropy, mb.packed.scatter_padded(logp[..., 1:], length, fill=-math.log(k + 1))
        if mb.topk_ids is None:
            return logp, entropy, None
        return logp[..., 0], entropy, logp[..., 1:]

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        """Set up, resume if a checkpoint exists, train to `steps`, checkpoint, export.

        SIGUSR1 or SIGTERM (a scheduler's warning before a time limit or preemption) makes the run
        checkpoint after the current step and return; started again, it resumes from there.
        """
        latch_stop_signals()  # already done by gopd-train; again for a Trainer used as a library
        self.setup()
        cfg = self.cfg
        rank0 = dist.get_rank() == 0
        writer = MetricsWriter(self.output_dir, enabled=rank0, resume_step=self.start_step)
        progress = progress_bar(cfg.steps, self.start_step, enabled=rank0)
        try:
            for step in range(self.start_step, cfg.steps):
                metrics = {"step": step + 1, **self.train_step(step)}
                writer.write(metrics)
                progress.update(1)
                progress.set_postfix(loss=f"{metrics['loss']:.4f}", kl=first_with_prefix(metrics, "reverse_kl/"))
                done = step + 1 == cfg.steps
                stop = self._stop_agreed()
                if done or stop or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                    self.save_checkpoint(step + 1)
                if stop and not done:
                    logger.warning(
                        "stop signal received: checkpointed step %d and stopping; run the same command again to resume",
                        step + 1,
                    )
                    return
        finally:
            progress.close()
            writer.close()
        if cfg.export_hf:
            self.export_hf()

    def _stop_agreed(self) -> bool:
        """True on every rank when any rank was asked to stop (the checkpoint is collective)."""
        flag = torch.tensor([float(stop_requested())])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def save_checkpoint(self, step: int) -> Path:
        """Write the training checkpoint of `step` (collective); see `TrainCheckpointer.save`."""
        return self.checkpointer.save(step)

    def latest_checkpoint(self) -> Optional[Path]:
        """The newest complete checkpoint of this run, if any."""
        return self.checkpointer.latest()

    def export_hf(self) -> None:
        """The trained student as a HF directory under ``<output_dir>/hf`` (streamed, atomic;
        a previous export is replaced only once the new one is complete)."""
        from megatron_gopd.bridge.convert import write_hf_directory

        out = self.output_dir / "hf"
        write_hf_directory(
            self.model.module, self.arch, out, Path(self.cfg.student.checkpoint) / HF_SUBDIR, replace=True
        )
        logger.info("exported the student to %s", out)

    def close(self) -> None:
        """Release the scoring pool's process groups and models, then the rollout engine."""
        if getattr(self, "pool", None) is not None:
            self.pool.close()
        if getattr(self, "engine", None) is not None:
            self.engine.close()
