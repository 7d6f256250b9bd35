"""Training checkpoints: save, find, resume and prune, with exact resume of Adam, scheduler, data and RNG.

A training checkpoint is a model checkpoint (loadable by every command, at any layout: see
`megatron_gopd.checkpointing`) plus the optimizer's shards, the scheduler, the data position,
every rank's RNG state and torch Adam's update count (``trainer_state.json``, ``rng_states.pt``).
It is written atomically under ``<output_dir>/checkpoints/step_NNNNNN``; a directory without
``trainer_state.json`` is never resumed from.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_gopd.checkpointing import HF_SUBDIR, load_distributed, load_torch_file, save_model_checkpoint
from megatron_gopd.collectives import all_gather_object, rank

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
TRAINER_STATE_FILE = "trainer_state.json"
RNG_STATES_FILE = "rng_states.pt"


class TrainCheckpointer:
    """Saves and restores the whole training state of one run (every call is collective).

    Args:
        checkpoint_dir: where ``step_NNNNNN`` directories go.
        model: the student (Megatron DDP-wrapped GPTModel).
        optimizer, scheduler: Megatron's optimizer and parameter scheduler.
        sampler: the prompt sampler (``state_dict`` / ``load_state_dict``).
        student_checkpoint: the initial student checkpoint (its HF side files are copied).
        meta: the metadata recorded in each checkpoint (the student's, with the run's dtype and layout).
        keep: how many of the newest checkpoints to keep.
    """

    def __init__(
        self,
        checkpoint_dir: Path,
        *,
        model,
        optimizer,
        scheduler,
        sampler,
        student_checkpoint: str,
        meta: dict[str, Any],
        keep: int,
    ) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.sampler = sampler
        self.student_checkpoint = student_checkpoint
        self.meta = meta
        self.keep = keep

    def _sharded_state_dict(self, is_loading: bool = False) -> dict:
        model_sd = self.model.module.sharded_state_dict()
        # dp_reshardable: every rank writes its own optimizer shard, no gathers; a resume may change
        # the data-parallel size but not TP/PP (the model part of the checkpoint reshards freely).
        optimizer_sd = self.optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "dp_reshardable"}
        )
        return {"model": model_sd, "optimizer": optimizer_sd}

    def save(self, step: int) -> Path:
        """Model, optimizer, scheduler, every rank's RNG and the data position, written atomically."""
        target = self.checkpoint_dir / f"{CHECKPOINT_PREFIX}{step:06d}"
        if target.exists():
            return target
        rng_states = all_gather_object({"torch": torch.get_rng_state(), "python": random.getstate()})
        trainer_state = {
            "step": step,
            "scheduler": self.scheduler.state_dict(),
            "data": self.sampler.state_dict(),
            "adam_step": self._adam_step(),
        }

        def write_training_state(tmp: Path) -> None:
            (tmp / TRAINER_STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
            torch.save(rng_states, tmp / RNG_STATES_FILE)

        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        out = save_model_checkpoint(
            self.model.module,
            target,
            hf_source_dir=Path(self.student_checkpoint) / HF_SUBDIR,
            meta={**self.meta, "trained_steps": step},
            sharded_state_dict=self._sharded_state_dict(),
            write_extra=write_training_state,
        )
        logger.info("saved checkpoint %s", out)
        if rank() == 0:
            self.prune()
        return out

    def remove_interrupted_saves(self, *directories: Path) -> list[Path]:
        """Delete what killed saves left behind in the checkpoint directory (and `directories`):
        the hidden ``.<name>.tmp-*`` / ``.<name>.old-*`` directories of atomic writes. Call on one
        rank, before resuming, while this job holds the output directory."""
        removed = []
        for directory in (self.checkpoint_dir, *directories):
            if not directory.is_dir():
                continue
            for leftover in directory.glob(".*"):
                if leftover.is_dir() and (".tmp-" in leftover.name or ".old-" in leftover.name):
                    shutil.rmtree(leftover, ignore_errors=True)
                    removed.append(leftover)
        if removed:
            logger.info(
                "removed %d leftover(s) of interrupted saves: %s", len(removed), ", ".join(p.name for p in removed)
            )
        return removed

    def prune(self) -> None:
        """Delete all but the newest `keep` complete checkpoints."""
        complete = sorted(p for p in self.checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())
        for old in complete[: max(len(complete) - self.keep, 0)]:
            shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint (temporary directories of interrupted saves are ignored)."""
        if not self.checkpoint_dir.is_dir():
            return None
        complete = sorted(
            p
            for p in self.checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*")
            if p.is_dir() and (p / TRAINER_STATE_FILE).is_file()
        )
        return complete[-1] if complete else None

    def resume(self) -> int:
        """Load the newest checkpoint if there is one; return the step to continue from (0 if none)."""
        latest = self.latest()
        if latest is None:
            return 0
        # The optimizer's state tensors must exist before a checkpoint can be loaded into them.
        for optimizer in self._optimizers():
            optimizer.init_state_fn(optimizer.optimizer, optimizer.config)
            # torch's Adam (used when neither apex nor TE is installed) also keeps a per-parameter
            # 'step', which Megatron's distributed optimizer reads when building its state dict.
            for state in optimizer.optimizer.state.values():
                state.setdefault("step", torch.tensor(0.0))
        state = load_distributed(self._sharded_state_dict(is_loading=True), latest)
        self.model.module.load_state_dict(state["model"])
        with torch.no_grad():  # the optimizer copies into its fp32 main parameters in place
            self.optimizer.load_state_dict(state["optimizer"])
        trainer_state = json.loads((latest / TRAINER_STATE_FILE).read_text())
        self._set_adam_step(trainer_state["adam_step"])
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        self.sampler.load_state_dict(trainer_state["data"])
        rng = load_torch_file(latest / RNG_STATES_FILE)[rank()]  # weights_only=True
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        logger.info("resumed from %s (step %d)", latest, trainer_state["step"])
        return int(trainer_state["step"])

    def _optimizers(self) -> list:
        return list(getattr(self.optimizer, "chained_optimizers", [self.optimizer]))

    def _torch_adam_states(self) -> list[dict]:
        return [state for optimizer in self._optimizers() for state in optimizer.optimizer.state.values()]

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
