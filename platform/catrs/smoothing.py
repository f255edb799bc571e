"""Randomized smoothing (Cohen, Rosenfeld, Kolter 2019): PREDICT and CERTIFY, batched and reproducible.

The smoothed classifier g(x) = argmax_c P(f(x + δ) = c), δ ~ N(0, σ²I), is robust around x: if the top
class has probability p_A ≥ 1/2, g is constant within ℓ2 radius σ·Φ⁻¹(p_A). `Smooth` estimates that by Monte
Carlo, with the guarantees stated on each method, and mirrors the contract of Cohen's `core.py`:

    smooth = Smooth(base_classifier, num_classes, sigma)
    label, radius = smooth.certify(x, n0, n, alpha, batch_size)

Beyond it: `certify_batch` / `predict_batch` run several inputs through one pass (a small model cannot fill
an accelerator with one input's noise); noise is drawn on the model's device from a stream keyed by
(seed, dataset index, phase), so any sharding of a data set gives the same rows as one unsplit run; counts
stay on the device until one host read per batch of inputs.

Used by `catrs certify` / `catrs predict` (see `catrs.certify`). The math: docs/methods.md, "Certification".
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from enum import IntEnum

import numpy as np
import torch
from scipy.stats import binomtest, norm
from statsmodels.stats.proportion import proportion_confint

from catrs.inference import Classifier, model_device, prepare_for_inference
from catrs.sampling import DEFAULT_INFERENCE

ABSTAIN = -1


class NoiseStream(IntEnum):
    """Independent noise streams per input: CERTIFY's selection and estimation samples never overlap."""

    SELECTION = 0
    ESTIMATION = 1
    PREDICTION = 2
    VOTES = 3  # soft-label vote histograms (CAT-RS's teacher)


def noise_seed(seed: int, index: int, stream: NoiseStream) -> int:
    """A 63-bit generator seed determined by (seed, index, stream) alone, well mixed by NumPy's SeedSequence."""
    words = np.random.SeedSequence([seed, index, int(stream)]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31 | int(words[1])) & (2**63 - 1)


def clopper_pearson_lower(successes: np.ndarray | int, trials: int, alpha: float) -> np.ndarray:
    """One-sided (1 − alpha) Clopper–Pearson lower confidence bound on a binomial proportion."""
    return np.asarray(proportion_confint(successes, trials, alpha=2 * alpha, method="beta")[0], dtype=float)


def certified_radius(p_lower: np.ndarray, sigma: float) -> np.ndarray:
    """σ·Φ⁻¹(p_lower) where p_lower ≥ 1/2, else 0 (the input is abstained on)."""
    p_lower = np.asarray(p_lower, dtype=float)
    return np.where(p_lower >= 0.5, sigma * norm.ppf(np.clip(p_lower, 0.5, 1.0)), 0.0)


def _forward_plan(num_inputs: int, num: int, batch_size: int) -> Iterator[list[tuple[int, int]]]:
    """The forward passes that draw `num` samples for each input: lists of (input, sample count).

    Each input's samples come in chunks of min(num, batch_size) (the last one shorter), and chunks are packed
    greedily into passes of at most `batch_size`. Chunk sizes depend only on (num, batch_size), never on the
    other inputs, so an input's noise is the same whichever inputs share its passes.
    """
    chunk = min(num, batch_size)
    whole, rest = divmod(num, chunk)
    pieces: list[tuple[int, int]] = []
    filled = 0
    for owner in range(num_inputs):
        for size in itertools.chain(itertools.repeat(chunk, whole), [rest] if rest else []):
            if filled + size > batch_size:
                yield pieces
                pieces, filled = [], 0
            pieces.append((owner, size))
            filled += size
    if pieces:
        yield pieces


class Smooth:
    """A smoothed classifier around `base_classifier`, which maps (B, *input_shape) to (B, num_classes) logits.

    `seed` fixes every noise stream. `mixed_precision` runs the base classifier under autocast (bf16 on CPU,
    fp16 on CUDA): faster, but the certificate's argument assumes the base classifier is the function being
    evaluated, and low-precision logits make it a slightly different one, so it is off by default and
    recorded in every result it produces. `inference` picks how the model is run
    (`catrs.inference.INFERENCE_MODES`); it never changes the logits beyond float tolerance.

    The smoothed classifier is the base classifier in eval mode: `base_classifier` is put in eval mode, and
    with `channels_last` or `compile` (the default is `channels_last`) a copy of it, taken here, is what runs —
    weights changed after construction are not seen; smooth the changed model anew.
    """

    def __init__(
        self,
        base_classifier: Classifier,
        num_classes: int,
        sigma: float,
        *,
        seed: int = 0,
        mixed_precision: bool = False,
        inference: str = DEFAULT_INFERENCE,
    ) -> None:
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.base_classifier = base_classifier
        self.num_classes = num_classes
        self.sigma = float(sigma)
        self.seed = seed
        self.mixed_precision = mixed_precision
        self.device = model_device(base_classifier)
        self._forward = prepare_for_inference(base_classifier, inference)
        self._anonymous_calls = itertools.count()

    # --- Cohen's contract: one input at a time -------------------------------------------------------------

    def certify(
        self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int, *, index: int | None = None
    ) -> tuple[int, float]:
        """Cohen's CERTIFY on one input x (C, H, W): (prediction, ℓ2 radius) or (ABSTAIN, 0.0).

        With probability at least 1 − alpha over the noise, if the prediction is not ABSTAIN, the smoothed
        classifier predicts it everywhere within the radius. Uses exactly n0 selection samples and n fresh
        estimation samples. `index` keys the noise stream (the dataset index); without it, calls are numbered.
        """
        return self.certify_batch(x.unsqueeze(0), n0, n, alpha, batch_size, indices=self._keys(1, index))[0]

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int, *, index: int | None = None) -> int:
        """Cohen's PREDICT on one input: the smoothed prediction, or ABSTAIN.

        With probability at least 1 − alpha over the noise, a returned class is the smoothed classifier's
        prediction at x (a two-sided binomial test of the top two counts).
        """
        return self.predict_batch(x.unsqueeze(0), n, alpha, batch_size, indices=self._keys(1, index))[0]

    # --- batched forms -------------------------------------------------------------------------------------

    def certify_batch(
        self,
        xs: torch.Tensor,
        n0: int,
        n: int,
        alpha: float,
        batch_size: int,
        *,
        indices: Sequence[int] | None = None,
    ) -> list[tuple[int, float]]:
        """CERTIFY for each of the k inputs xs (k, C, H, W), sharing forward passes; same guarantee per input.

        Row i equals `certify(xs[i], ..., index=indices[i])`: each input's noise depends only on its index.
        """
        _check_sampling(n, alpha, batch_size, n0=n0)
        keys = self._keys(len(xs), indices)
        guess = self._select(xs, n0, batch_size, keys)
        return self._estimate(xs, guess, n, alpha, batch_size, keys)

    def evaluate_batch(
        self,
        xs: torch.Tensor,
        labels: Sequence[int],
        n0: int,
        n: int,
        alpha: float,
        batch_size: int,
        *,
        indices: Sequence[int] | None = None,
    ) -> list[tuple[int, float, bool]]:
        """CERTIFY's contribution to ACR and certified accuracy for inputs of known `labels`, for fewer samples.

        An input whose selected class is not its label counts 0 at every radius whatever its estimation says,
        so it gets no estimation samples and comes back as (selected class, 0.0, False): an evaluation, not a
        certificate. Every other input is estimated from the same noise as in `certify_batch` and comes back as
        its row, with True. So ACR and certified accuracy at every radius equal CERTIFY's exactly.
        """
        _check_sampling(n, alpha, batch_size, n0=n0)
        keys = self._keys(len(xs), indices)
        guess = self._select(xs, n0, batch_size, keys).cpu().numpy()  # which inputs to estimate: a host read
        rows = [(int(c), 0.0, False) for c in guess]
        right = np.flatnonzero(guess == np.asarray(labels))
        if len(right):
            estimated = self._estimate(
                xs[right], torch.from_numpy(guess[right]), n, alpha, batch_size, [keys[i] for i in right]
            )
            for i, (predicted, radius) in zip(right, estimated, strict=True):
                rows[i] = (predicted, radius, True)
        return rows

    def _select(self, xs: torch.Tensor, n0: int, batch_size: int, keys: list[int]) -> torch.Tensor:
        """CERTIFY's first phase: each input's most frequent class over n0 samples (on the device)."""
        selection = self.sample_counts(xs, n0, batch_size, indices=keys, stream=NoiseStream.SELECTION)
        return selection.argmax(dim=1)

    def _estimate(
        self, xs: torch.Tensor, guess: torch.Tensor, n: int, alpha: float, batch_size: int, keys: list[int]
    ) -> list[tuple[int, float]]:
        """CERTIFY's second phase: (guess, radius) from n fresh samples, or (ABSTAIN, 0.0)."""
        estimation = self.sample_counts(xs, n, batch_size, indices=keys, stream=NoiseStream.ESTIMATION)
        n_a = estimation.gather(1, guess.to(estimation.device)[:, None]).squeeze(1)
        guess_host, n_a_host = guess.cpu().numpy(), n_a.cpu().numpy()  # the one host read of the phase
        radii = certified_radius(clopper_pearson_lower(n_a_host, n, alpha), self.sigma)
        return [(int(c), float(r)) if r > 0 else (ABSTAIN, 0.0) for c, r in zip(guess_host, radii, strict=True)]

    def predict_batch(
        self,
        xs: torch.Tensor,
        n: int,
        alpha: float,
        batch_size: int,
        *,
        indices: Sequence[int] | None = None,
    ) -> list[int]:
        """PREDICT for each of the k inputs xs (k, C, H, W), sharing forward passes; same guarantee per input."""
        _check_sampling(n, alpha, batch_size)
        counts = self.sample_counts(
            xs, n, batch_size, indices=self._keys(len(xs), indices), stream=NoiseStream.PREDICTION
        )
        top2_counts, top2_labels = (t.cpu().numpy() for t in counts.topk(2, dim=1))
        return [
            ABSTAIN if binomtest(int(c1), int(c1 + c2), 0.5).pvalue > alpha else int(label)
            for (c1, c2), label in zip(top2_counts, top2_labels[:, 0], strict=True)
        ]

    def sample_counts(
        self,
        xs: torch.Tensor,
        num: int,
        batch_size: int,
        *,
        indices: Sequence[int],
        stream: NoiseStream,
    ) -> torch.Tensor:
        """Class counts (k, num_classes) of f(x_i + δ) over `num` noise draws per input, on the model's device.

        Nothing is read back to the host: each pass's predictions are counted on the device (one `bincount`
        over all its inputs) into the running counts, so memory holds one pass, whatever `num` is.
        """
        xs = xs.to(self.device, torch.float32)
        if len(indices) != len(xs):
            raise ValueError(f"got {len(xs)} inputs but {len(indices)} indices")
        generators = [
            torch.Generator(device=self.device).manual_seed(noise_seed(self.seed, int(i), stream)) for i in indices
        ]
        counts = torch.zeros(len(xs) * self.num_classes, dtype=torch.long, device=self.device)
        with torch.inference_mode(), self._autocast():
            for pieces in _forward_plan(len(xs), num, batch_size):
                noisy, owner_offsets = self._noisy_batch(xs, pieces, generators)
                logits = self._forward(noisy)
                if logits.shape[-1] != self.num_classes:
                    raise ValueError(f"base classifier gives {logits.shape[-1]} logits, expected {self.num_classes}")
                counts += torch.bincount(logits.argmax(dim=1) + owner_offsets, minlength=len(counts))
        return counts.view(len(xs), self.num_classes)

    # --- helpers -------------------------------------------------------------------------------------------

    def _noisy_batch(
        self, xs: torch.Tensor, pieces: list[tuple[int, int]], generators: list[torch.Generator]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass's inputs x_i + δ and, per row, i·num_classes (to count all inputs in one bincount)."""
        total = sum(size for _, size in pieces)
        noisy = torch.empty((total, *xs.shape[1:]), device=self.device, dtype=torch.float32)
        owner_offsets = torch.empty(total, device=self.device, dtype=torch.long)
        start = 0
        for owner, size in pieces:
            noisy[start : start + size].normal_(0.0, self.sigma, generator=generators[owner]).add_(xs[owner])
            owner_offsets[start : start + size] = owner * self.num_classes
            start += size
        return noisy, owner_offsets

    def _keys(self, count: int, indices: Sequence[int] | int | None) -> list[int]:
        if indices is None:
            return [next(self._anonymous_calls) for _ in range(count)]
        keys = [indices] if isinstance(indices, int) else [int(i) for i in indices]
        if len(keys) != count or any(k < 0 for k in keys):
            raise ValueError(f"need {count} non-negative indices, got {indices!r}")
        return keys

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.mixed_precision:
            return contextlib.nullcontext()
        dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)


def _check_sampling(n: int, alpha: float, batch_size: int, n0: int | None = None) -> None:
    if n0 is not None and n0 < 1:
        raise ValueError(f"n0 must be at least 1, got {n0}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
