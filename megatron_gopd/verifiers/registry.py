"""Verifier registry: pick the verifier for each sample and score responses (one or a batch).

A sample is a dict from the dataset. The verifier is chosen by its ``verifier`` field when present
(a registry name such as ``"math"``), otherwise by its ``domain`` field through the domain map
(``"math" -> math``, ``"code" -> code``). The verifier then reads its own fields:

- math: ``answer``, the reference final answer (see `math_verifier`);
- code: ``tests``, stdin/stdout cases or assert code (see `code_verifier`).

Example::

    from megatron_gopd.verifiers import score
    score({"domain": "math", "answer": "1/2"}, "... so the answer is \\\\boxed{0.5}").reward  # 1.0

An unknown verifier or domain raises `UnknownVerifierError` (a dataset or config bug must not be
scored silently as 0). To use other limits, build a `VerifierRegistry` with configured verifiers
(or `register` replacements in the default one).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, Optional, Protocol, Sequence, runtime_checkable

from megatron_gopd.verifiers.code_verifier import CodeVerifier
from megatron_gopd.verifiers.math_verifier import MathVerifier
from megatron_gopd.verifiers.result import VerifierResult

DEFAULT_DOMAINS: dict[str, str] = {"math": "math", "code": "code"}


@runtime_checkable
class Verifier(Protocol):
    """Anything that scores one response for one sample."""

    name: str

    def __call__(self, sample: Mapping[str, Any], response: str) -> VerifierResult:
        """Return the result; raise ValueError when the sample lacks the fields it needs."""
        ...


class UnknownVerifierError(KeyError):
    """A sample names a verifier, or has a domain, that the registry does not know."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


class VerifierRegistry:
    """Verifiers by name, plus the map from a sample's ``domain`` to a verifier name."""

    def __init__(
        self,
        verifiers: Optional[Mapping[str, Verifier]] = None,
        domains: Optional[Mapping[str, str]] = None,
    ) -> None:
        self._verifiers: dict[str, Verifier] = dict(verifiers or {})
        self._domains: dict[str, str] = dict(DEFAULT_DOMAINS if domains is None else domains)

    def register(self, name: str, verifier: Verifier, *, overwrite: bool = False) -> None:
        """Add ``verifier`` under ``name``; replacing an existing name needs ``overwrite=True``."""
        if name in self._verifiers and not overwrite:
            raise ValueError(f"verifier {name!r} is already registered (pass overwrite=True)")
        self._verifiers[name] = verifier

    def map_domain(self, domain: str, verifier_name: str) -> None:
        """Route samples of ``domain`` (without a ``verifier`` field) to ``verifier_name``."""
        self._domains[domain] = verifier_name

    def names(self) -> list[str]:
        """Registered verifier names, sorted."""
        return sorted(self._verifiers)

    def resolve(self, sample: Mapping[str, Any]) -> Verifier:
        """The verifier for ``sample``: its ``verifier`` field, else its ``domain`` mapped."""
        name = sample.get("verifier")
        if name is None:
            domain = sample.get("domain")
            if domain not in self._domains:
                raise UnknownVerifierError(
                    f"sample has domain {domain!r} and no 'verifier' field; known domains: "
                    f"{', '.join(sorted(self._domains))}; "
                    f"known verifiers: {', '.join(self.names())}"
                )
            name = self._domains[domain]
        if name not in self._verifiers:
            raise UnknownVerifierError(f"unknown verifier {name!r}; known verifiers: {', '.join(self.names())}")
        return self._verifiers[name]

    def score(self, sample: Mapping[str, Any], response: str) -> VerifierResult:
        """Score one response with the sample's verifier."""
        return self.resolve(sample)(sample, response)

    def score_batch(
        self, samples: Sequence[Mapping[str, Any]], responses: Sequence[str], max_workers: int = 2
    ) -> list[VerifierResult]:
        """Score ``responses[i]`` against ``samples[i]`` for all i, ``max_workers`` at a time.

        Every sample's verifier is resolved before anything runs, so a bad sample fails fast.
        Threads suffice: the work happens in subprocesses (sandbox runs, math workers).
        """
        if len(samples) != len(responses):
            raise ValueError(f"{len(samples)} samples but {len(responses)} responses")
        verifiers = [self.resolve(sample) for sample in samples]
        if max_workers <= 1 or len(samples) <= 1:
            return [v(s, r) for v, s, r in zip(verifiers, samples, responses)]
        with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="verifier") as pool:
            return list(pool.map(lambda v, s, r: v(s, r), verifiers, samples, responses))


_default: Optional[VerifierRegistry] = None
_default_lock = threading.Lock()


def default_registry() -> VerifierRegistry:
    """The process-wide registry with the math and code verifiers at their default limits.

    Created on first use; math worker processes start only when a math sample is scored.
    """
    global _default
    with _default_lock:
        if _default is None:
            _default = VerifierRegistry({"math": MathVerifier(), "code": CodeVerifier()})
        return _default


def score(sample: Mapping[str, Any], response: str) -> VerifierResult:
    """Score one response with the default registry (see the module docstring)."""
    return default_registry().score(sample, response)


def score_batch(
    samples: Sequence[Mapping[str, Any]], responses: Sequence[str], max_workers: int = 2
) -> list[VerifierResult]:
    """Score a batch with the default registry; see `VerifierRegistry.score_batch`."""
    return default_registry().score_batch(samples, responses, max_workers)


__all__ = [
    "DEFAULT_DOMAINS",
    "UnknownVerifierError",
    "Verifier",
    "VerifierRegistry",
    "default_registry",
    "score",
    "score_batch",
]
