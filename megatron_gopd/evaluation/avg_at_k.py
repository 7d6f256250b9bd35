"""avg@k / pass@k evaluation: k samples per prompt from the rollout engine, scored by the verifiers.

    report, verdicts = evaluate(engine, tokenizer, records, sampling, dp_rank=r, dp_size=n)

Every data-parallel replica generates for its own slice of the prompts; verdicts are gathered so
that every rank returns the same `EvalReport`. avg@k is the mean over prompts of the fraction of
a prompt's k samples that are correct (the paper's metric); pass@k is the fraction of prompts with
at least one correct sample (with exactly k samples drawn, the unbiased estimator reduces to it).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional, Sequence

import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class DomainScore:
    """The scores of one domain."""

    prompts: int
    samples: int
    avg_at_k: float
    pass_at_k: float
    mean_response_tokens: float
    truncated_frac: float


@dataclasses.dataclass
class EvalReport:
    """Per-domain scores plus the overall (prompt-weighted) ones."""

    k: int
    domains: dict[str, DomainScore]
    overall: DomainScore

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "overall": dataclasses.asdict(self.overall),
            "domains": {name: dataclasses.asdict(score) for name, score in self.domains.items()},
        }

    def table(self) -> str:
        """A plain-text table for the terminal."""
        rows = [("domain", "prompts", f"avg@{self.k}", f"pass@{self.k}", "resp. tokens", "truncated")]
        for name, s in [*sorted(self.domains.items()), ("overall", self.overall)]:
            rows.append(
                (
                    name,
                    str(s.prompts),
                    f"{100 * s.avg_at_k:.1f}",
                    f"{100 * s.pass_at_k:.1f}",
                    f"{s.mean_response_tokens:.1f}",
                    f"{100 * s.truncated_frac:.1f}%",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join(
            "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in rows
        )


@dataclasses.dataclass(frozen=True)
class SampleVerdict:
    """One scored sample (what ranks exchange)."""

    prompt_index: int
    domain: str
    correct: bool
    response_tokens: int
    truncated: bool
    response: Optional[str] = None
    """The decoded response, kept only when `evaluate` is asked to return the samples."""


def aggregate(verdicts: Sequence[SampleVerdict], k: int) -> EvalReport:
    """avg@k and pass@k per domain and overall from individual sample verdicts."""
    by_prompt: dict[int, list[SampleVerdict]] = {}
    for verdict in verdicts:
        by_prompt.setdefault(verdict.prompt_index, []).append(verdict)

    def score(prompts: list[list[SampleVerdict]]) -> DomainScore:
        samples = [v for group in prompts for v in group]
        n = max(len(prompts), 1)
        return DomainScore(
            prompts=len(prompts),
            samples=len(samples),
            avg_at_k=sum(sum(v.correct for v in g) / len(g) for g in prompts) / n,
            pass_at_k=sum(any(v.correct for v in g) for g in prompts) / n,
            mean_response_tokens=sum(v.response_tokens for v in samples) / max(len(samples), 1),
            truncated_frac=sum(v.truncated for v in samples) / max(len(samples), 1),
        )

    domains: dict[str, list[list[SampleVerdict]]] = {}
    for group in by_prompt.values():
        domains.setdefault(group[0].domain, []).append(group)
    return EvalReport(
        k=k, domains={name: score(groups) for name, groups in domains.items()}, overall=score(list(by_prompt.values()))
    )


def evaluate(
    engine,
    tokenizer,
    records: Sequence,
    sampling,
    *,
    dp_rank: int = 0,
    dp_size: int = 1,
    registry=None,
    scoring_rank: bool = True,
    keep_samples: bool = False,
) -> tuple[EvalReport, list[SampleVerdict]]:
    """Generate ``sampling.n`` samples for this replica's slice of `records`, verify, gather.

    Args:
        engine: a `RolloutEngine` over the model (every rank of the replica calls `generate`).
        tokenizer: decodes responses for the verifiers.
        records: all prompts (`data.PromptRecord`), identical on every rank.
        sampling: `rollout.SamplingParams`; ``n`` is k.
        dp_rank, dp_size: this replica and the number of replicas; replica r takes records
            r, r + dp_size, ...
        registry: a `VerifierRegistry` (default: math and code verifiers at default limits).
        scoring_rank: whether this rank verifies its replica's samples (one rank per replica should).
        keep_samples: also return every sample's decoded text (in the verdicts).

    Returns:
        The report and every sample's verdict (all replicas'), identical on every rank.
    """
    from megatron_gopd.verifiers import default_registry

    registry = registry or default_registry()
    mine = list(records)[dp_rank::dp_size]
    batch = engine.generate([r.input_ids for r in mine], sampling) if mine else []
    verdicts: list[SampleVerdict] = []
    if scoring_rank:
        for sample in batch:
            record = mine[sample.prompt_index]
            text = tokenizer.decode(sample.token_ids, skip_special_tokens=True)
            result = registry.score(record.verifier_fields(), text)
            verdicts.append(
                SampleVerdict(
                    record.index,
                    record.domain,
                    bool(result.correct),
                    len(sample.token_ids),
                    sample.finish_reason == "length",
                    response=text if keep_samples else None,
                )
            )
    gathered: list[Optional[list[SampleVerdict]]] = [verdicts]
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, verdicts)
    everything = [v for part in gathered for v in (part or [])]
    return aggregate(everything, sampling.n), everything
