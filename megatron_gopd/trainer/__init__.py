"""The `gopd-train` job: configuration, the per-micro-batch objective, metrics, checkpoints, the loop.

Modules, each with one job:

- `config`: `TrainConfig` and its parts, `check_train_config` (everything checked before ranks start);
- `objective`: `TrainObjective`, the loss of one micro-batch (G-OPD policy gradient, top-k reverse
  KL, outcome reward, SFT), with lam and the reference carried per row;
- `rewards`: verifier rewards of the rollouts and their group-normalised advantages;
- `metrics`: typed metric accumulators reduced over ranks, the ``metrics.jsonl`` writer;
- `checkpoint`: `TrainCheckpointer` (save, resume exactly, prune);
- `loop`: `Trainer`, which wires them to the rollout engine, the scoring pool and Megatron.

The package may import everything below it (rollout, scoring, loss, logprobs, batching, data,
models, bridge, checkpointing, platform); nothing below imports it, only `megatron_gopd.cli`.
"""

from megatron_gopd.trainer.config import (
    LossConfig,
    OptimConfig,
    OutcomeRewardConfig,
    RolloutConfig,
    StudentConfig,
    TrainConfig,
    TrainPlan,
    check_train_config,
    data_domains,
)
from megatron_gopd.trainer.loop import Trainer
from megatron_gopd.trainer.objective import TrainObjective

__all__ = [
    "LossConfig",
    "OptimConfig",
    "OutcomeRewardConfig",
    "RolloutConfig",
    "StudentConfig",
    "TrainConfig",
    "TrainPlan",
    "TrainObjective",
    "Trainer",
    "check_train_config",
    "data_domains",
]
