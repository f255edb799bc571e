"""Randomized smoothing (Cohen, Rosenfeld, Kolter 2019): PREDICT and CERTIFY, batched and reproducible.

The smoothed classifier g(x) = argmax_c P(f(x + δ) = c), δ ~ N(0, σ²I), is robust around x: if the top
class has probability p_A ≥ 1/2, g is constant within ℓ2 radius σ·Φ⁻¹(p_A). `Smooth` estimates that by Monte
Carlo, with the guarantees stated on each method, and mirrors the contract of Cohen's `core.py`:

    smooth = Smooth(base_classifier, num_classes, sigma)
    label, radius = smooth.certify(x, n0, n, alpha, batch_size)

Beyond it: `certify_batch` / `predict_batch` run several inputs through one pass (a small model cannot fill
an accelerator with one input's noise); noise is drawn on the model's device from a stream keyed by
(seed, dataset index, phase), so any sharding of a data set gives the same rows as one unsplit run; counts
stay on the device until one host read per batch of inputs. `certify_adaptive` gives CERTIFY's guarantee for
fewer samples: each input's estimation sample size is chosen from an independent pilot (`catrs.adaptive`).

Used by `catrs certify` / `catrs predict` (see `catrs.certify`). The math: docs/methods.md, "Certification".
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Iterator, Sequence
from enum import IntEnum
from typing import NamedTuple

import numpy as np
import torch
from scipy.stats import binomtest, norm
from statsmodels.stats.proportion import proportion_confint

from catrs.adaptive import SampleSizePlanner
from catrs.inference import Classifier, model_device, prepare_for_inference
from catrs.sampling import DEFAULT_INFERENCE, MAX_ALPHA

ABSTAIN = -1


class NoiseStream(IntEnum):
    """Independent noise streams per input: CERTIFY's selection and estimation samples never overlap."""

    SELECTION = 0
    ESTIMATION = 1
    PREDICTION = 2
    VOTES = 3  # soft-label vote histograms (CAT-RS's teacher)
    PILOT = 4  # adaptive CERTIFY's pilot beyond the selection: a part per round


def noise_seed(seed: int, index: int, stream: NoiseStream, part: int = 0) -> int:
    """A 63-bit generator seed determined by (seed, index, stream, part) alone, well mixed by NumPy's
    SeedSequence. Part 0 is the stream's first (and, except the pilot's, only) part."""
    words = np.random.SeedSequence([seed, index, int(stream), *([part] if part else [])]).generate_state(2, np.uint32)
    return (int(words[0]) << 31 | int(words[1])) & (2**63 - 1)


def clopper_pearson_lower(successes: np.ndarray | int, trials: np.ndarray | int, alpha: float) -> np.ndarray:
    """One-sided (1 − alpha) Clopper–Pearson lower confidence bound on a binomial proportion."""
    return np.asarray(proportion_confint(successes, trials, alpha=2 * alpha, method="beta")[0], dtype=float)


def certified_radius(p_lower: np.ndarray, sigma: float) -> np.ndarray:
    """σ·Φ⁻¹(p_lower) where p_lower ≥ 1/2, else 0 (the input is abstained on)."""
    p_lower = np.asarray(p_lower, dtype=float)
    return np.where(p_lower >= 0.5, sigma * norm.ppf(np.clip(p_lower, 0.5, 1.0)), 0.0)


class Certificate(NamedTuple):
    """Adaptive CERTIFY's answer for one input: (prediction, radius) as CERTIFY's, and the samples it took:
    `pilot` (the n0 selection samples and the pilot beyond them) and `estimation` (those of the bound).
    `estimated` is False only in an evaluation, where the selected class was wrong."""

    prediction: int
    radius: float
    pilot: int
    estimation: int
    estimated: bool = True


@functools.lru_cache(maxsize=8)
def _planner(n_max: int, alpha: float, tolerance: float) -> SampleSizePlanner:
    """Planners are kept: their tables take a fraction of a second to build."""
    return SampleSizePlanner(n_max, alpha, tolerance)


def _forward_plan(nums: Sequence[int], batch_size: int) -> Iterator[list[tuple[int, int]]]:
    """The forward passes that draw nums[i] samples for each input i: lists of (input, sample count).

    Each input's samples come in chunks of min(nums[i], batch_size) (the last one shorter), and chunks are
    packed greedily into passes of at most `batch_size`. Chunk sizes depend only on (nums[i], batch_size),
    never on the other inputs, so an input's noise is the same whichever inputs share its passes.
    """
    pieces: list[tuple[int, int]] = []
    filled = 0
    for owner, num in enumerate(nums):
        if num < 1:
            continue
        chunk = min(num, batch_size)
        whole, rest = divmod(num, chunk)
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

    def certify_adaptive(
        self,
        x: torch.Tensor,
        n0: int,
        n_max: int,
        alpha: float,
        batch_size: int,
        *,
        tolerance: float,
        index: int | None = None,
    ) -> tuple[int, float]:
        """Adaptive CERTIFY on one input: (prediction, ℓ2 radius) or (ABSTAIN, 0.0), with CERTIFY's guarantee.

        With probability at least 1 − alpha over the noise, if the prediction is not ABSTAIN, the smoothed
        classifier predicts it everywhere within the radius. The selection is CERTIFY's (n0 samples); an
        independent pilot chooses how many fresh estimation samples, at most n_max, give a radius within
        `tolerance`·σ of n_max's for every p_A it leaves plausible (`catrs.adaptive`); the bound is
        Clopper–Pearson's on those samples at level 1 − alpha. docs/methods.md, "Adaptive CERTIFY".
        """
        keys = self._keys(1, index)
        answer = self.certify_adaptive_batch(
            x.unsqueeze(0), n0, n_max, alpha, batch_size, tolerance=tolerance, indices=keys
        )
        return answer[0].prediction, answer[0].radius

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

    def certify_adaptive_batch(
        self,
        xs: torch.Tensor,
        n0: int,
        n_max: int,
        alpha: float,
        batch_size: int,
        *,
        tolerance: float,
        indices: Sequence[int] | None = None,
        labels: Sequence[int] | None = None,
    ) -> list[Certificate]:
        """Adaptive CERTIFY for each of the k inputs xs, sharing forward passes at every stage (inputs at
        different stages of the pilot, and with different sample sizes, share passes); one host read of
        counts per stage for all k. Row i equals `certify_adaptive(xs[i], ..., index=indices[i])`.

        With `labels` it is an evaluation, as `evaluate_batch` is `certify_batch`'s: an input whose selected
        class is not its label gets no pilot and no estimation (`estimated` False, radius 0).

        docs/methods.md, "Adaptive CERTIFY": the selection, then rounds in which the inputs whose pilot pays to
        grow double it while the others are estimated with the size the planner gives them, all of a round in
        the same passes."""
        keys = self._keys(len(xs), indices)
        _check_sampling(n_max, alpha, batch_size, n0=n0)
        if not (math.isfinite(tolerance) and tolerance >= 0):
            raise ValueError(f"tolerance must be a non-negative number (in units of sigma), got {tolerance}")
        planner = _planner(n_max, alpha, tolerance)
        selection = self.sample_counts(xs, n0, batch_size, indices=keys, stream=NoiseStream.SELECTION)
        guess = selection.argmax(dim=1)  # CERTIFY's selection; its counts start the pilot
        successes, trials, guess_host = self._count_of(guess, selection), np.full(len(xs), n0), guess.cpu().numpy()
        chosen = np.ones(len(xs), dtype=bool) if labels is None else guess_host == np.asarray(labels)
        sizes, n_a = np.zeros(len(xs), dtype=np.int64), np.zeros(len(xs), dtype=np.int64)
        piloting = np.flatnonzero(chosen)
        for part in itertools.count(1):  # a round: some inputs double their pilot, the others are estimated
            grows = planner.wants_more_pilot(successes[piloting], trials[piloting])
            growing, settled = piloting[grows], piloting[~grows]
            sizes[settled] = planner.sample_sizes(successes[settled], trials[settled])
            estimating = settled[sizes[settled] > 0]
            if not len(growing) + len(estimating):
                break
            seeds = [noise_seed(self.seed, keys[i], NoiseStream.PILOT, part) for i in growing]
            seeds += [noise_seed(self.seed, keys[i], NoiseStream.ESTIMATION) for i in estimating]
            which = np.concatenate([growing, estimating])
            nums = np.concatenate([trials[growing], sizes[estimating]]).tolist()
            counts = self._count_of(guess[which], self._counts(xs[which], nums, batch_size, seeds))
            successes[growing] += counts[: len(growing)]
            trials[growing] *= 2
            n_a[estimating] = counts[len(growing) :]
            piloting = growing
        lower = clopper_pearson_lower(n_a, np.maximum(sizes, 1), alpha)
        radii = np.where(sizes > 0, certified_radius(lower, self.sigma), 0.0)
        return [
            Certificate(int(c) if not ok or r > 0 else ABSTAIN, float(r), int(m), int(n), bool(ok))
            for c, r, m, n, ok in zip(guess_host, radii, np.where(chosen, trials, n0), sizes, chosen, strict=True)
        ]

    @staticmethod
    def _count_of(guess: torch.Tensor, counts: torch.Tensor) -> np.ndarray:
        """Each input's count of its guessed class, read to the host (one read for all inputs)."""
        return counts.gather(1, guess.to(counts.device)[:, None]).squeeze(1).cpu().numpy()

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
        """Class counts (k, num_classes) of f(x_i + δ) over `num` noise draws of `stream` per input, on the
        model's device.

        Nothing is read back to the host: each pass's predictions are counted on the device (one `bincount`
        over all its inputs) into the running counts, so memory holds one pass, whatever `num` is.
        """
        if len(indices) != len(xs):
            raise ValueError(f"got {len(xs)} inputs but {len(indices)} indices")
        seeds = [noise_seed(self.seed, int(i), stream) for i in indices]
        return self._counts(xs, [num] * len(xs), batch_size, seeds)

    def _counts(self, xs: torch.Tensor, nums: Sequence[int], batch_size: int, seeds: Sequence[int]) -> torch.Tensor:
        """Class counts (k, num_classes) over nums[i] draws for input i from a generator seeded with seeds[i]."""
        xs = xs.to(self.device, torch.float32)
        generators = [torch.Generator(device=self.device).manual_seed(seed) for seed in seeds]
        counts = torch.zeros(len(xs) * self.num_classes, dtype=torch.long, device=self.device)
        with torch.inference_mode(), self._autocast():
            for pieces in _forward_plan(nums, batch_size):
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
    if not 0 < alpha < MAX_ALPHA:
        raise ValueError(f"alpha must lie in (0, {MAX_ALPHA:g}), got {alpha}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
