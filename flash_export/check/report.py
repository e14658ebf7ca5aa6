"""What a validation found: per case, per backend, and the whole report with its verdict.

`parity.run_cases` fills the case and backend results; `validate` (and, for transformers
checkpoints, `hf_validate`) wraps them in a `ValidationReport` with the structural checks.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from flash_export.artifacts.trust import Provenance
from flash_export.check.structural import Check
from flash_export.core.tolerance import Comparison
from flash_export.nn.spec import ModelSpec


@dataclass(frozen=True)
class Case:
    """One input configuration: the batch, a size per dynamic name, and whether masks mask.

    `mask`: attention masks are fed (else left out, or all True where a graph needs one) and
    padding masks pad (else every token is real).
    """

    batch: int
    sizes: Tuple[Tuple[str, int], ...]
    mask: bool

    @property
    def seq_q(self) -> int:
        """The query length (q_len, else seq, else 0)."""
        sizes = dict(self.sizes)
        return sizes.get("q_len", sizes.get("seq", 0))

    @property
    def seq_k(self) -> int:
        """The key length (k_len, else seq, else 0)."""
        sizes = dict(self.sizes)
        return sizes.get("k_len", sizes.get("seq", 0))

    @property
    def label(self) -> str:
        """Short human-readable form, e.g. `B=3 Lq=7 Lk=9 mask` or `B=2 seq=65 padded`."""
        sizes = dict(self.sizes)
        if "q_len" in sizes:
            return (f"B={self.batch} Lq={sizes['q_len']} Lk={sizes.get('k_len', 0)}"
                    + (" mask" if self.mask else ""))
        named = " ".join(f"{k}={v}" for k, v in self.sizes)
        return f"B={self.batch}" + (f" {named}" if named else "") + (" mask" if self.mask else "")

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready view."""
        return {"batch": self.batch, "seq_q": self.seq_q, "seq_k": self.seq_k,
                "sizes": dict(self.sizes), "mask": self.mask}


@dataclass
class CaseResult:
    """The errors of one backend on one case and output, or the error that stopped it."""

    case: Case
    output: str = "output"
    comparison: Optional[Comparison] = None
    error: Optional[str] = None

    @property
    def passed(self) -> bool:
        """True when it ran and met the tolerance."""
        return self.error is None and self.comparison is not None and self.comparison.passed

    @property
    def label(self) -> str:
        """The case's label, with the output's name when it is not the only "output"."""
        return self.case.label + ("" if self.output == "output" else f" [{self.output}]")

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready view."""
        return {**self.case.to_dict(), "output": self.output, "passed": self.passed,
                "error": self.error, **(self.comparison.to_dict() if self.comparison else {})}


@dataclass
class BackendResult:
    """One compared implementation (eager, torchscript, onnx:<target>) and its cases."""

    name: str
    source: str  # the file it ran from, or "(in memory)"
    load_error: Optional[str] = None
    cases: List[CaseResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when it loaded and every case passed."""
        return self.load_error is None and all(c.passed for c in self.cases)

    @property
    def failures(self) -> List[CaseResult]:
        """The cases that failed."""
        return [c for c in self.cases if not c.passed]

    def worst(self) -> Optional[CaseResult]:
        """The case with the largest max abs error relative to its bound (errors first)."""
        def key(c: CaseResult) -> float:
            if c.comparison is None:
                return math.inf
            return c.comparison.max_abs / max(c.comparison.bound, 1e-30)
        return max(self.cases, key=key, default=None)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready view."""
        return {"name": self.name, "source": self.source, "passed": self.passed,
                "load_error": self.load_error, "cases": [c.to_dict() for c in self.cases]}


@dataclass
class ValidationReport:
    """Everything `validate` found; `passed` is the verdict."""

    artifact: str
    kind: str  # "onnx", "torchscript" or "pt2"
    target: Optional[str]
    dtype: str
    provider: str
    spec: Optional[ModelSpec]  # None: the caller passed a model object
    spec_source: str  # "artifact", "caller" or "checkpoint" (a transformers checkpoint's)
    provenance: Provenance
    rule: str
    checks: List[Check] = field(default_factory=list)
    backends: List[BackendResult] = field(default_factory=list)
    reference: Optional[str] = None  # what the reference is, when not the spec's plain attention

    @property
    def passed(self) -> bool:
        """True when every structural check and every backend passed."""
        return all(c.passed for c in self.checks) and all(b.passed for b in self.backends)

    def failure_lines(self) -> List[str]:
        """One line per failed check, backend load or case, naming the backend and shape."""
        lines = [f"check {c.name}: expected {c.expected}, got {c.got}"
                 for c in self.checks if not c.passed]
        for b in self.backends:
            if b.load_error:
                lines.append(f"{b.name}: failed to load: {b.load_error}")
            for r in b.failures:
                if r.error:
                    lines.append(f"{b.name} {r.case.label}: {r.error}")
                elif r.comparison is not None:
                    c = r.comparison
                    lines.append(f"{b.name} {r.case.label}: max abs {c.max_abs:.3g} > bound "
                                 f"{c.bound:.3g} at {list(c.worst_index)} "
                                 f"(nonfinite {c.nonfinite})")
        return lines

    def raise_for_failures(self) -> None:
        """Raise ValidationError with the first failures when the report did not pass."""
        from flash_export.core.errors import ValidationError

        if not self.passed:
            lines = self.failure_lines()
            more = f" (+{len(lines) - 3} more)" if len(lines) > 3 else ""
            raise ValidationError("; ".join(lines[:3]) + more)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready view of the whole report."""
        return {
            "artifact": self.artifact, "kind": self.kind, "target": self.target,
            "dtype": self.dtype, "provider": self.provider, "passed": self.passed,
            "spec": dataclasses.asdict(self.spec) if self.spec else None,
            "spec_source": self.spec_source, "reference": self.reference,
            "provenance": dataclasses.asdict(self.provenance),
            "rule": self.rule,
            "checks": [dataclasses.asdict(c) for c in self.checks],
            "backends": [b.to_dict() for b in self.backends],
        }
