"""What a certification samples, and how it runs the model: the one definition of each, with its defaults.

Kept free of torch so that the command line takes its defaults from here without paying for the import.
"""

from __future__ import annotations

from dataclasses import dataclass
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


# The most samples per image a protocol may ask for: 10^12, a million times the published n (the radius it
# certifies is within 0.01σ of n = 10^11's). Counting needs memory for one forward pass, not for n.
MAX_SAMPLES = 10**12


@dataclass(frozen=True)
class SamplingProtocol:
    """CERTIFY's sampling protocol: `n0` selection and `n` estimation samples per image, failure probability
    `alpha`, and `batch` noisy samples per forward pass. The defaults are the published protocol (Cohen et al.;
    docs/methods.md, "Certification"): those of `catrs certify` and of a sweep's final certification. A sweep
    file's `proxy`, `selection` and `final` sections are this type with their own extras."""

    n0: int = 100
    n: int = 100_000
    alpha: float = 0.001
    batch: int = 1000

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
        if not 0 < self.alpha < 1:
            found.append(("alpha", f"must lie strictly between 0 and 1, got {self.alpha}"))
        return found

    def protocol(self) -> SamplingProtocol:
        """Just the protocol (a sweep section without its extras)."""
        return SamplingProtocol(self.n0, self.n, self.alpha, self.batch)
