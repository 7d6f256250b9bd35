"""Teacher / reference scoring: forward-only Megatron models, each with its own parallel layout.

In a G-OPD step every sampled response token is scored by the prompt's teacher (``log pi*(y_t)``)
and, when the teacher's ``lam != 1``, by its reference (``log pi_ref(y_t)``: the student's initial
weights, or the teacher's pre-RL base for reward correction). `ScoringPool` holds those models and
computes these log-probs for the student's rollouts::

    plan = validate_scoring_config(cfg.scoring, student_checkpoint=cfg.student.checkpoint,
                                   student_layout=layout, world_size=world)  # one process, no groups
    # collective, after platform.init_model_parallel(...) for the student
    pool = ScoringPool(cfg.scoring, student_checkpoint=cfg.student.checkpoint, student_layout=layout,
                       plan=plan)         # plan=None: the pool validates on every rank itself
    requests = [ScoreRequest(rec.domain, rec.input_ids, response_ids, rec.messages)
                for rec, response_ids in rollouts]     # this rank's student-DP shard
    scores = pool.score(requests)      # collective
    advantages = gopd_advantages(student_logp, scores[i].teacher_logprobs, scores[i].ref_logprobs,
                                 scores[i].lam)
    pool.close()                       # collective: frees the models and the pool's process groups

What the package owns, one module each:

* `config`: `ScoringConfig`, `TeacherConfig`, `PoolModelConfig` and their value checks (no files);
* `plan`: `validate_scoring_config`, which checks the setup against the checkpoints once and
  returns the `ScoringPlan` the pool builds from (plain values: picklable, JSON via ``to_dict``);
* `pool`: `ScoringPool`, its requests and results (`ScoreRequest`, `SampleScores`, `ModelStats`)
  and how work reaches each model's replicas (in place or redistributed);
* `forward`: one model's forward-only pass over one replica's sequences.

Imports: `megatron_gopd.models`, `bridge`, `logprobs`, `parallel`, `collectives`, `batching`,
`checkpointing`, `data`, `config` and `platform`; never `trainer`, `cli` or `evaluation` (they
build on this package).
"""

from megatron_gopd.scoring.config import (
    STUDENT_INIT,
    PoolModelConfig,
    ScoringConfig,
    ScoringConfigError,
    TeacherConfig,
    UnroutedDomainError,
)
from megatron_gopd.scoring.plan import ModelPlan, ScoringPlan, validate_scoring_config
from megatron_gopd.scoring.pool import ModelStats, SampleScores, ScoreRequest, ScoringPool

__all__ = [
    "STUDENT_INIT",
    "ModelPlan",
    "ModelStats",
    "PoolModelConfig",
    "SampleScores",
    "ScoreRequest",
    "ScoringConfig",
    "ScoringConfigError",
    "ScoringPlan",
    "ScoringPool",
    "TeacherConfig",
    "UnroutedDomainError",
    "validate_scoring_config",
]
