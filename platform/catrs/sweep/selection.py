"""The end of a sweep: the choice on the val split, then its one look at the test split.

Candidates are the trials trained to their last epoch; trials that ASHA stopped are not, since their
checkpoints are partly trained models, not what their settings produce. The `selection.top_k` candidates
with the best last proxy are certified on val with the selection protocol (by default the file's final one,
in `evaluate` mode: CERTIFY's exact ACR, with no estimation samples spent on images whose selected class is
wrong), and the best of them wins: the proxy only shortlists, the validation protocol decides. The winning
setting is then, if `selection.refit`, trained again on the whole training split, and — the test split
unsealed only now — certified on test with the final protocol. This module is the policy and the requests;
`catrs.sweep.run` carries them out.

    catrs tune demo_digits                         (the sweep driver calls these after its trials)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catrs.certify import CertifyRequest, CertifySettings
from catrs.sampling import Mode
from catrs.sweep.proxy import spread
from catrs.sweep.space import SearchSpace
from catrs.sweep.trial import TrialCheckpoint

VAL_PREFIX = "final_val_"  # the selection's figures on val, apart from the proxy's `val_…` per epoch
TEST_PREFIX = "test_"


@dataclass
class Candidate:
    """A trial trained to its last epoch, and what the selection measured of it."""

    trial_id: str
    point: dict[str, Any]  # its searched values
    proxy: float  # the objective of its last proxy (`val_OBJECTIVE`)
    checkpoint: TrialCheckpoint  # its last epoch's
    val_metrics: dict[str, float] = field(default_factory=dict)  # `final_val_…`, once certified

    def val(self, objective: str) -> float:
        return self.val_metrics.get(VAL_PREFIX + objective, math.nan)


def shortlist(candidates: list[Candidate], top_k: int) -> list[Candidate]:
    """The `top_k` candidates by their last proxy (ties keep the trials' order)."""
    ranked = sorted(candidates, key=lambda c: -c.proxy if math.isfinite(c.proxy) else math.inf)
    return ranked[:top_k]


def choose(shortlisted: list[Candidate], objective: str) -> Candidate:
    """The candidate with the best validation figure; among equals, the better proxy."""
    return max(shortlisted, key=lambda c: (c.val(objective), c.proxy))


def validation_request(space: SearchSpace, checkpoint: Path, out: Path, val_size: int) -> CertifyRequest:
    """A candidate's certification on val with the selection protocol, on `images` val images spread evenly
    over the split of `val_size` (all for 0)."""
    selection = space.selection
    skip, max_index = spread(val_size, selection.images)
    return CertifyRequest(
        checkpoint=checkpoint,
        dataset=space.dataset,
        sigma=space.sigma,
        out=out,
        settings=CertifySettings(selection.protocol(), seed=space.seed),
        mode=Mode.EVALUATE,
        split="val",
        skip=skip,
        max_index=max_index,
    )


def trained_out_val_request(space: SearchSpace, checkpoint: Path, out: Path) -> CertifyRequest:
    """A trained-out run on every val image with the file's final protocol: the reference a benchmark ranks
    trials and fidelities against (the selection's own figure where it certifies all of val)."""
    return CertifyRequest(
        checkpoint=checkpoint,
        dataset=space.dataset,
        sigma=space.sigma,
        out=out,
        settings=CertifySettings(space.final.protocol(), seed=space.seed),
        mode=Mode.EVALUATE,
        split="val",
    )


def final_request(space: SearchSpace, checkpoint: Path, out: Path) -> CertifyRequest:
    """The winner on the test split with the file's final protocol: the sweep's one look at it."""
    final = space.final
    return CertifyRequest(
        checkpoint=checkpoint,
        dataset=space.dataset,
        sigma=space.sigma,
        out=out,
        settings=CertifySettings(final.protocol(), seed=space.seed),
        skip=final.skip,
        max_index=final.max,
    )
