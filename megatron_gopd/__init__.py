"""megatron-gopd: Generalized On-Policy Distillation (G-OPD) on Megatron-Core.

The student samples its own responses, teachers (and a reference model) score every sampled token,
and the student is trained with dense per-token advantages
``lam * (log pi_teacher - log pi_ref) - (log pi_student - log pi_ref)``. See README.md.

Layers, each importing only from the layers below it (never from `cli`, ``tools/`` or ``examples/``):

    cli                       the `gopd-*` entry points
    trainer, evaluation       the on-policy loop; the `gopd-eval` job and ExPO
    rollout, scoring, loss    sampling from the student; teachers and references; the G-OPD loss
    data, verifiers, batching prompts and chat templates; outcome rewards; micro-batch packing
    bridge, checkpointing     HF <-> Megatron weights and checkpoints
    models, logprobs          HF config -> Megatron model; vocab-parallel log-prob kernels
    platform, cpu_compat      device and distributed start-up; megatron-core on CPU
    config, log               typed YAML configs; logging set-up

`verifiers`, `logprobs`, `data` and `cpu_compat` import nothing else from megatron_gopd.
"""

__version__ = "0.1.0"
