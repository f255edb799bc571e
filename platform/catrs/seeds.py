"""Seeds derived from words (a run's seed, an epoch, a rank, an index): well mixed and the same everywhere.

The training loop seeds each epoch's noise and data order from (seed, epoch[, rank]), the teacher's votes
each training view from (seed, index), so a run resumed or sharded anywhere draws what an uninterrupted one
would have.
"""

from __future__ import annotations

import numpy as np


def derived_seed(*words: int) -> int:
    """A seed determined by `words` alone (e.g. seed, epoch), well mixed by NumPy's SeedSequence."""
    return int(np.random.SeedSequence(list(words)).generate_state(1)[0])
