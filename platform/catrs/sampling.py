"""What a certification samples, and how it runs the model: the one definition of each, with its defaults.

Kept free of torch so that the command line takes its defaults from here without paying for the import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from enum import Enum

# How the base classifier is run for noise sampling (`catrs.inference`); all give the same logits.
INFERENCE_MODES = ("eager", "channels_last", "compile")
# The default for every certification: see `catrs.inference` for the measurements behind it.
DEFAULT_INFERENCE = "channels_last"


class Mode(str, Enum):
    """What a certification computes per image: Cohen's CERTIFY (a prediction and a certified radius), his
    PREDICT (a prediction or an abstention), or a sweep's `evaluate` (CERTIFY's contribution to ACR, with no
    estimation samples spent where the selected class is already wrong: docs/methods.md)."""

    CERTIFY = "certify"
    PREDICT = "predict"
    EVALUATE = "evaluate"


# The radius (in σ) an adaptive certification may give up against n_max, by default: it keeps ≥ 0.99× fixed n's
# ACR both on the published CAT-RS distribution and on the demo's model, whose radii are smaller, so the same
# loss in σ is a larger share of its ACR (benchmarks/adaptive_certify.py measures both).
DEFAULT_TOLERANCE = 0.01
MAX_TOLERANCE = 1.0  # σ: beyond it, an "adaptive" certificate would be a different, much weaker measurement

# The most samples per image a protocol may ask for: 10^12, a million times the published n (the radius it
# certifies is within 0.01σ of n = 10^11's). Counting needs memory for one forward pass, not for n.
MAX_SAMPLES = 10**12

# CERTIFY holds with probability 1 − α and is defined for α < ½ (Cohen et al.): its one-sided bound is the lower
# end of a two-sided interval at 2α, so at α ≥ ½ it is a Beta quantile at the median or above: no lower bound,
# and the radii grow with α.
MAX_ALPHA = 0.5


@dataclass(frozen=True)
class SamplingProtocol:
    """CERTIFY's sampling protocol: `n0` selection and `n` estimation samples per image, failure probability
    `alpha`, and `batch` noisy samples per forward pass. The defaults are the published protocol (Cohen et al.;
    docs/methods.md, "Certification"): those of `catrs certify` and of a sweep's final certification. A sweep
    file's `proxy`, `selection` and `final` sections are this type with their own extras.

    `adaptive` makes n the largest n of adaptive CERTIFY, which may give up at most `tolerance`·σ of each
    image's radius against it (docs/methods.md, "Adaptive CERTIFY")."""

    n0: int = 100
    n: int = 100_000
    alpha: float = 0.001
    batch: int = 1000
    adaptive: bool = False
    tolerance: float = DEFAULT_TOLERANCE

    @property
    def procedure(self) -> str:
        return "adaptive" if self.adaptive else "fixed"

    def provenance(self) -> dict[str, object]:
        """What a result records of the procedure (tolerance 0 for fixed n, which gives up nothing)."""
        return {"procedure": self.procedure, "tolerance": self.tolerance if self.adaptive else 0.0}

    def problems(self) -> list[tuple[str, str]]:
        """(field, what is wrong with it) for every value out of range: the one check of a protocol, whether it
        comes from the command line or from a sweep file."""
        found = [
            (name, f"must be a positive integer, got {getattr(self, name)}")
            for name in ("n0", "n", "batch")
            if getattr(self, name) < 1
        ]
        found += [
            (name, f"must be at most {MAX_SAMPLES:,} (10^12), got {getattr(self, name):,}")
            for name in ("n0", "n", "batch")
            if getattr(self, name) > MAX_SAMPLES
        ]
        if not 0 < self.alpha < MAX_ALPHA:
            problem = f"must lie strictly between 0 and {MAX_ALPHA:g} (CERTIFY is defined for α < ½), got {self.alpha}"
            found.append(("alpha", problem))
        if not (math.isfinite(self.tolerance) and 0 <= self.tolerance <= MAX_TOLERANCE):
            found.append(
                ("tolerance", f"must lie between 0 and {MAX_TOLERANCE:g} (units of sigma), got {self.tolerance}")
            )
        return found

    def protocol(self) -> SamplingProtocol:
        """Just the protocol (a sweep section without its extras)."""
        return SamplingProtocol(**{f.name: getattr(self, f.name) for f in fields(SamplingProtocol)})
