"""megatron-gopd: Generalized On-Policy Distillation (G-OPD) on Megatron-Core.

The student samples its own responses, teachers (and a reference model) score every sampled token,
and the student is trained with dense per-token advantages
``lam * (log pi_teacher - log pi_ref) - (log pi_student - log pi_ref)``. See README.md.
"""

__version__ = "0.1.0"
