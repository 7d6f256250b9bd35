"""Evaluation: the `gopd-eval` job (avg@k over sampled responses) and the ExPO weight baseline.

Owns:
    avg_at_k   avg@k / pass@k aggregation and the sampling + verification loop
    eval_job   the `gopd-eval` job (model loading, data, report)
    expo       theta_base + alpha * (theta_teacher - theta_base) over HF checkpoints

May import: `megatron_gopd.verifiers` (the scoring of each response), `rollout`, `models`, `bridge`,
`checkpointing`, `data` and `platform`; nothing imports it except the CLI and tools. Its modules import
torch or megatron-core, so nothing is imported here: import the module you need.
"""
