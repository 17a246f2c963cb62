"""Empirical privacy audit in one training run (Steinke, Nasr & Jagielski 2023, arXiv 2305.08846): the statistics
and the white-box canaries; the runners that train (`trainables.audit`) sit beside the training loop.

The test. m canaries (records the auditor made up) are each put into the training set by a secret fair coin
``S_i`` (+1 in, -1 out), independently. After training, the auditor scores every canary, guesses "in" for the
``k+`` highest scores and "out" for the ``k-`` lowest, abstains on the rest, and counts its correct guesses.
If the mechanism is (epsilon, delta)-DP with respect to adding or removing any one canary, the number W of
correct guesses out of r satisfies (their Theorem 5.2, computed as in their Algorithm/appendix code)

    P[W >= v] <= P[Binomial(r, p_eps) >= v] + 2 m delta max_{i=1..v} P[v-i <= Binomial(r, p_eps) < v] / i,
    p_eps = e^eps / (1 + e^eps),

whatever the scores and the guessing rule (any post-processing of what the mechanism released). The audit
reports the largest epsilon this p-value rejects at level beta = 1 - confidence (`epsilon_lower_bound`):
a *lower bound* on the epsilon of the mechanism actually run, valid with probability >= confidence over the
coins and the mechanism. A bound above the claimed epsilon means the claim is wrong (a bug); a bound below it
proves nothing about the claim's tightness, because one run with m canaries cannot measure large epsilons
(with all r guesses correct the bound is only about ``ln(r / ln(1/beta))``) and our scores are not optimal.

Choosing (k+, k-). We try a small fixed set of splits (`DEFAULT_GUESS_SPLITS`, fractions of m) and report the
best, at level ``beta / len(splits)`` each: by the union bound the reported maximum exceeds the true epsilon
with probability <= beta.

Testing the claim. ``claim_p_value`` is a p-value of "the mechanism is (claimed epsilon, delta)-DP": the theorem's
bound at the claim itself, the smallest over the rules times their number. Several audits (the cells of one
``dpsweep audit``) are one family: each bound is computed at ``beta / n`` (`bonferroni_confidence`: all n bounds
hold together with probability >= 1 - beta) and a claim is refuted when its Holm-adjusted p-value
(`holm_adjusted_p_values`) is below beta (family-wise error <= beta). With one audit both are the plain test.

Power. Whatever the mechanism, the bound cannot exceed the one every guess being right gives (`epsilon_ceiling`,
about ``ln(r / ln(1/beta'))`` for r guesses at level beta'): a claim above it cannot be refuted at that level. More
canaries raise it only while the theorem's ``2 m delta`` term stays small against beta' (at delta = 6e-6 and
one audit the best split's ceiling is 4.5 at m = 1000, 5.7 at m = 4000, 5.9 at m = 10000 and falls beyond).

White-box canaries (`DiracCanaries`, run by `trainables.audit.white_box_audit`). Canary i is a Dirac gradient:
``D e_{j_i}`` at one parameter coordinate ``j_i`` (distinct coordinates, drawn by a public seeded rule), with
``D = CANARY_GRADIENT_FACTOR * C`` far above the clip norm C. Canaries are records of the training set *as seen by
the mechanism*: each included canary joins every step's Poisson batch with the trial's rate q, by the same sampling
code and the same secret stream as the real records (`poisson_batches`), and its gradient row is appended to the
per-sample gradients (`private_step(..., extra_grad_samples=...)`), so the engine's own clipping (L2 over all
parameters, every grad-sample mode) brings it to C and the engine's own noise covers it. The bound therefore tests
exactly the accountant's claim for the trial's (sigma, q, steps): DP-SGD with Poisson rate q, clip C, noise sigma C,
steps steps, add/remove adjacency. (Canaries present at *every* step would not be subsampled, so a correct mechanism
could legitimately exceed the subsampled epsilon; we do not do that.) The auditor observes every step's noisy
clipped sum (``p.grad`` after the step, times B/C: units of C), which the accountant's adaptive composition
covers. Scores: ``likelihood_ratio`` (default; ``sum_t log(1 - q + q exp((x_t - 1/2) / sigma^2))``, the
Neyman-Pearson statistic of one Poisson-subsampled Gaussian canary at the claimed sigma) or ``sum``
(``sum_t x_t``). Real records train the model as usual (a few of them suffice: what matters is that the real
step code runs); their gradients at canary coordinates only blur the scores. What the white-box audit cannot see:
canary rows are explicit per-sample gradients added after the engine has computed the real samples' norms, so the
per-layer rules of the book-keeping engine (``bk``: instantiated per-sample gradients or ghost norms, per layer) never
touch a canary; a bug there cannot show. The black-box audit trains through the trial's own engine and covers them.

Patient level. For a ``privacy_unit: patient`` trial the records are patients (each clipped as one record, its images'
gradients summed) sampled at the patient rate, and each canary is one more patient record: one Dirac row, Poisson-
sampled with the patients, appended after the per-patient grouping so that it is never summed into a patient
(`trainables.privacy.patients.private_patient_step`). The claim is the patient-level (sigma, q, steps) epsilon; the
statistics above are unchanged, a canary being a record of the mechanism either way.

More exposure. Each canary's exposure is fixed by the mechanism (Poisson rate q over the trial's steps); more
canaries (a larger m) is the only valid lever: each is its own record, so about ``m q / 2`` canaries join each step.
Repeating a canary in a step, or putting it in every step, would test a group or an unsubsampled mechanism, whose
epsilon legitimately exceeds the claim.

Secrets. The coins, the canaries' Poisson sampling and the DP noise come from ``os.urandom`` with full entropy:
the sampling and the noise from torch generators whose whole state is derived from a 128-bit
`trainables.privacy.randomness.secret_seed` (`trainables.privacy.randomness.generator_from_seed`; ``manual_seed``
would keep 32 bits) or a `SecureRandom` in secure mode (`secret_mechanism_streams`; `secret_global_rng` for a random
init); the coins and tie-breaks from numpy generators seeded with 256 bits (`secret_numpy_generator`). Nothing of
them is returned or logged: the result (`AuditResult`) carries only counts, the bound and p-values.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy import special, stats
from torch import nn

from trainables import names
from trainables.config import PrivacyConfig
from trainables.errors import UserError
from trainables.privacy.randomness import generator_from_seed, secret_seed
from trainables.privacy.secure import SecureRandom

__all__ = [
    "AUDIT_KINDS",
    "AuditBound",
    "AuditError",
    "AuditResult",
    "CANARY_GRADIENT_FACTOR",
    "DEFAULT_CONFIDENCE",
    "DEFAULT_GUESS_SPLITS",
    "DiracCanaries",
    "GuessOutcome",
    "WHITE_BOX_SCORES",
    "audit_bound",
    "audit_metric",
    "bonferroni_confidence",
    "check_auditable",
    "claim_p_value",
    "epsilon_ceiling",
    "epsilon_lower_bound",
    "guess",
    "holm_adjusted_p_values",
    "likelihood_ratio_scores",
    "p_value",
    "place_dirac_canaries",
    "secret_global_rng",
    "secret_mechanism_streams",
    "secret_numpy_generator",
]

AuditKind = Literal["white_box", "black_box"]
WhiteBoxScore = Literal["likelihood_ratio", "sum"]

AUDIT_KINDS: tuple[str, ...] = ("white_box", "black_box")
WHITE_BOX_SCORES: tuple[str, ...] = ("likelihood_ratio", "sum")
BLACK_BOX_SCORE = "negative_loss"
DEFAULT_CONFIDENCE = 0.95

DEFAULT_GUESS_SPLITS: tuple[tuple[float, float], ...] = (
    (0.01, 0.0),
    (0.02, 0.0),
    (0.05, 0.0),
    (0.1, 0.0),
    (0.2, 0.0),
    (0.05, 0.05),
    (0.1, 0.1),
    (0.25, 0.25),
)
"""(k+/m, k-/m) pairs tried; the bound of each is at level beta / len(splits) (union bound). Chosen before
any data: DP-SGD canaries are detected mostly by their high scores (a canary sampled in no step looks out)."""

CANARY_GRADIENT_FACTOR = 1000.0
"""A Dirac canary's gradient norm in units of the clip norm C: clipping must bring it down to C."""

EPSILON_GRID_COARSE = 0.05
EPSILON_GRID_FINE = 0.001
EPSILON_MAX = 64.0
"""`epsilon_lower_bound` searches [0, EPSILON_MAX] on a grid (coarse, then fine at the first rejection)."""

# The <name> part of the metric keys `audit/<kind>/<name>` (`trainables.names.audit_metric`).
EPSILON_LOWER_BOUND = "epsilon_lower_bound"
CLAIMED_EPSILON = "claimed_epsilon"
CANARIES = "m"
GUESSES = "guesses"
CORRECT = "correct"
CONFIDENCE = "confidence"
WALL_TIME_S = "wall_time_s"
CLAIM_P_VALUE = "claim_p_value"
EPSILON_CEILING = "epsilon_ceiling"
HOLM_P_VALUE = "holm_p_value"  # logged by `dpsweep audit` once its family of audits is done (`sweeps.audit`)


class AuditError(UserError, ValueError):
    """An audit's setting the model or data cannot meet (such as more canaries than coordinates); says the fix."""


def audit_metric(kind: str, name: str) -> str:
    """Flat metric key ``audit/<kind>/<name>`` (`trainables.names.audit_metric`)."""
    if kind not in AUDIT_KINDS:
        raise ValueError(f"audit kind {kind!r} is not one of {AUDIT_KINDS}")
    return names.audit_metric(kind, name)


# ---------------------------------------------------------------------------------------------------------
# Statistics (pure numpy/scipy)


def p_value(epsilon: float, *, m: int, guesses: int, correct: int, delta: float) -> float:
    """Upper bound on P[>= ``correct`` right out of ``guesses``] for any (epsilon, delta)-DP mechanism.

    Steinke-Nasr-Jagielski Theorem 5.2 (module docstring): the binomial tail at p = e^eps/(1+e^eps) plus
    ``2 m delta max_i P[v-i <= Bin(r, p) < v] / i``. ``m`` is the number of canaries (coins), ``guesses`` the
    non-abstentions r.
    """
    if not (0 <= correct <= guesses <= m):
        raise ValueError(f"need 0 <= correct <= guesses <= m, got correct={correct}, guesses={guesses}, m={m}")
    if not (epsilon >= 0 and 0 <= delta <= 1):
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    p = float(special.expit(epsilon))
    tail = float(stats.binom.sf(correct - 1, guesses, p))  # P[Bin(r, p) >= v]
    if delta > 0 and correct > 0:
        below = stats.binom.pmf(np.arange(correct - 1, -1, -1), guesses, p)  # P[X = v-1], P[X = v-2], ...
        alpha = float(np.max(np.cumsum(below) / np.arange(1, correct + 1)))  # max_i P[v-i <= X <= v-1] / i
        tail += alpha * delta * 2 * m
    return min(tail, 1.0)


def epsilon_lower_bound(*, m: int, guesses: int, correct: int, delta: float, beta: float) -> float:
    """The largest epsilon rejected at level ``beta``: P[bound > true epsilon] <= beta.

    Scans an increasing grid G (step `EPSILON_GRID_COARSE`, then `EPSILON_GRID_FINE` after the first coarse
    point not rejected) and returns the last point before the first grid point with p-value >= beta
    (0 if epsilon = 0 is not rejected). Validity needs no monotonicity of `p_value`: if the mechanism is
    (eps*, delta)-DP and the bound L > eps*, the smallest grid point e >= eps* is <= L, so p(e) < beta, an
    event of probability <= beta because the mechanism is also (e, delta)-DP. Rounding is downwards.
    """
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), got {beta}")

    def rejected(epsilon: float) -> bool:
        return p_value(epsilon, m=m, guesses=guesses, correct=correct, delta=delta) < beta

    if not rejected(0.0):
        return 0.0
    coarse = 0.0
    while coarse + EPSILON_GRID_COARSE <= EPSILON_MAX and rejected(coarse + EPSILON_GRID_COARSE):
        coarse += EPSILON_GRID_COARSE
    fine = coarse
    steps = round(EPSILON_GRID_COARSE / EPSILON_GRID_FINE)
    for i in range(1, steps):
        if not rejected(coarse + i * EPSILON_GRID_FINE):
            break
        fine = coarse + i * EPSILON_GRID_FINE
    return fine


@dataclass(frozen=True)
class GuessOutcome:
    """One guessing rule applied: "in" for the ``n_in`` highest scores, "out" for the ``n_out`` lowest."""

    n_in: int
    n_out: int
    correct: int

    @property
    def guesses(self) -> int:
        return self.n_in + self.n_out


def guess(scores: np.ndarray, included: np.ndarray, n_in: int, n_out: int, rng: np.random.Generator) -> GuessOutcome:
    """Count correct guesses of the rule (``n_in`` top scores "in", ``n_out`` bottom "out"); ties at random.

    Args:
        scores: float [m], higher = more likely included.
        included: bool [m], the secret coins (True = S_i = +1).
        rng: breaks ties (a secret stream: ties must not correlate with the coins).
    """
    m = len(scores)
    if n_in < 0 or n_out < 0 or n_in + n_out > m:
        raise ValueError(f"need n_in, n_out >= 0 and n_in + n_out <= m={m}, got {n_in}, {n_out}")
    shuffle = rng.permutation(m)
    order = shuffle[np.argsort(-np.asarray(scores, dtype=np.float64)[shuffle], kind="stable")]  # descending
    top, bottom = order[:n_in], order[m - n_out :]
    correct = int(included[top].sum()) + int((~included[bottom]).sum())
    return GuessOutcome(n_in=n_in, n_out=n_out, correct=correct)


def claim_p_value(claimed_epsilon: float, outcomes: Sequence[GuessOutcome], *, m: int, delta: float) -> float:
    """A p-value of the claim "the mechanism is (``claimed_epsilon``, delta)-DP" from every rule tried.

    Each rule's `p_value` at the claim bounds P[>= its correct count] under the claim, so P[p_value <= a] <= a; the
    smallest over the rules, times their number, capped at 1, is again a p-value (union bound, as for the bound).
    It uses no grid: a claim can be refuted (p < beta) while the bound at beta, rounded down to the grid of
    `epsilon_lower_bound`, sits up to 0.001 below it.
    """
    if not outcomes:
        raise ValueError("need the outcome of at least one guessing rule")
    smallest = min(p_value(claimed_epsilon, m=m, guesses=o.guesses, correct=o.correct, delta=delta) for o in outcomes)
    return min(1.0, len(outcomes) * smallest)


def bonferroni_confidence(confidence: float, audits: int) -> float:
    """The confidence of each of ``audits`` bounds such that all hold together with probability >= ``confidence``:
    ``1 - (1 - confidence) / audits``."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if audits < 1:
        raise ValueError(f"need at least one audit, got {audits}")
    return 1 - (1 - confidence) / audits


def holm_adjusted_p_values(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (same order as given): rejecting every hypothesis whose adjusted
    p-value is below beta keeps the family-wise error <= beta, whatever the dependence between the tests.

    Sorted ascending p_(1) <= ... <= p_(n): ``adj_(j) = max_{k <= j} min(1, (n - k + 1) p_(k))``. With one p-value
    it is that p-value.
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1 or not ((p >= 0) & (p <= 1)).all():
        raise ValueError(f"need a 1-d sequence of p-values in [0, 1], got {p_values}")
    order = np.argsort(p, kind="stable")
    n = len(p)
    stepped = np.minimum(1.0, (n - np.arange(n)) * p[order])
    adjusted = np.empty(n, dtype=np.float64)
    adjusted[order] = np.maximum.accumulate(stepped)
    return adjusted


def epsilon_ceiling(
    m: int, *, delta: float, confidence: float, splits: Sequence[tuple[float, float]] = DEFAULT_GUESS_SPLITS
) -> float:
    """The largest bound `audit_bound` can report with m canaries: every guess of the best rule right.

    A claim at or above it cannot be refuted by any outcome (the audit's power limit, whatever the mechanism).
    """
    if not splits:
        raise ValueError("need at least one (k+, k-) split")
    beta = (1 - confidence) / len(splits)
    return max(
        epsilon_lower_bound(m=m, guesses=r, correct=r, delta=delta, beta=beta)
        for r in {math.floor(frac_in * m) + math.floor(frac_out * m) for frac_in, frac_out in splits}
    )


@dataclass(frozen=True)
class AuditBound:
    """The best bound over the tried guessing rules.

    Attributes:
        epsilon_lower_bound: the bound at overall confidence ``confidence`` (union bound over the rules).
        outcome: the rule that gave it (its guesses and correct count).
        m: canaries.
        confidence: 1 - beta.
        rules_tried: number of (k+, k-) splits; each bound was computed at beta / rules_tried.
        outcomes: every rule's outcome, in the order of the splits (for `claim_p_value`).
        delta: the delta of the claim tested.
    """

    epsilon_lower_bound: float
    outcome: GuessOutcome
    m: int
    confidence: float
    rules_tried: int
    outcomes: tuple[GuessOutcome, ...]
    delta: float

    def claim_p_value(self, claimed_epsilon: float) -> float:
        """`claim_p_value` of ``claimed_epsilon`` from these outcomes."""
        return claim_p_value(claimed_epsilon, self.outcomes, m=self.m, delta=self.delta)


def audit_bound(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    delta: float,
    confidence: float = DEFAULT_CONFIDENCE,
    splits: Sequence[tuple[float, float]] = DEFAULT_GUESS_SPLITS,
    rng: np.random.Generator | None = None,
) -> AuditBound:
    """Epsilon lower bound from canary scores and the secret coins, best of ``splits`` (union bound).

    Args:
        scores: float [m]; NaN is not allowed.
        included: bool [m].
        delta: the delta of the claim being tested.
        splits: (k+/m, k-/m) fractions, fixed before seeing the scores; k = floor(fraction * m).
        rng: tie-breaking; default a fresh ``os.urandom``-seeded generator. It must be independent of the
            coins (never the generator that drew them).

    The p-value's delta term is ``2 m delta alpha`` (alpha <= 1, a binomial mass ratio): with ``2 m delta``
    near ``beta / len(splits)`` the bound collapses to 0 (m = 1000, delta = 6e-6: 0.012 alpha vs 0.00625).
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and included {included.shape} must be equal 1-d shapes")
    if not np.isfinite(scores).all():
        raise ValueError("canary scores must be finite")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not splits:
        raise ValueError("need at least one (k+, k-) split")
    rng = rng if rng is not None else secret_numpy_generator()
    m = len(scores)
    beta = (1 - confidence) / len(splits)
    best: tuple[float, GuessOutcome] | None = None
    outcomes = []
    for frac_in, frac_out in splits:
        outcome = guess(scores, included, math.floor(frac_in * m), math.floor(frac_out * m), rng)
        outcomes.append(outcome)
        bound = epsilon_lower_bound(m=m, guesses=outcome.guesses, correct=outcome.correct, delta=delta, beta=beta)
        if best is None or bound > best[0]:
            best = (bound, outcome)
    assert best is not None
    return AuditBound(best[0], best[1], m, confidence, len(splits), tuple(outcomes), delta)


def likelihood_ratio_scores(observations: np.ndarray, noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Log-likelihood ratio of "in" vs "out" per canary: ``sum_t log(1 - q + q exp((x_t - 1/2) / sigma^2))``.

    Args:
        observations: float [steps, m], the noisy clipped sum at each canary's coordinate, in units of C
            (1 = one clipped canary).
        noise_multiplier: the claimed sigma (> 0).
        sample_rate: the claimed q.
    """
    if not noise_multiplier > 0:
        raise ValueError(f"the likelihood-ratio score needs sigma > 0, got {noise_multiplier}")
    z = (observations - 0.5) / noise_multiplier**2
    per_step = np.logaddexp(math.log1p(-sample_rate) if sample_rate < 1 else -np.inf, math.log(sample_rate) + z)
    return np.asarray(per_step.sum(axis=0), dtype=np.float64)


# ---------------------------------------------------------------------------------------------------------
# Secrets


def secret_numpy_generator() -> np.random.Generator:
    """A numpy generator seeded with 256 bits from ``os.urandom`` (never logged, never reproducible)."""
    return np.random.default_rng(int.from_bytes(os.urandom(32), "little"))


def secret_mechanism_streams(
    privacy: PrivacyConfig, device: torch.device
) -> tuple[torch.Generator | SecureRandom, torch.Generator | SecureRandom]:
    """(sampler, noise) streams of the trial's kind: `SecureRandom` in secure mode, else torch generators whose
    whole state comes from a fresh 128-bit `secret_seed` (the default mode of
    `trainables.privacy.randomness.mechanism_randomness`, whatever ``privacy.reproducible_noise`` says), the noise
    one on ``device``."""
    if privacy.secure_mode:
        rng = SecureRandom()
        return rng, rng
    return generator_from_seed(secret_seed()), generator_from_seed(secret_seed(), device)


@contextmanager
def secret_global_rng() -> Iterator[None]:
    """Inside the block, torch's global CPU generator has a whole state derived from a fresh 128-bit
    `secret_seed` (`generator_from_seed`); the caller's state is restored after it.

    For code that draws from the global generator, such as timm's random init (``torch.manual_seed`` would keep 32
    bits). The init need not be secret for the guarantee (it holds for any init independent of the data); this only
    keeps an audit's run unreproducible from anything logged.
    """
    with torch.random.fork_rng(devices=[]):
        torch.random.set_rng_state(generator_from_seed(secret_seed()).get_state())
        yield


# ---------------------------------------------------------------------------------------------------------
# Result


@dataclass(frozen=True)
class AuditResult:
    """What an audit releases: counts and the bound (never the coins, scores or seeds).

    Attributes:
        kind: ``white_box`` or ``black_box``.
        m: canaries.
        guesses: non-abstentions of the reported rule.
        correct: its correct guesses.
        epsilon_lower_bound: the empirical lower bound at ``confidence``.
        confidence: 1 - beta (overall, after the union bound over guessing rules).
        claimed_epsilon: the accountant's epsilon for the (sigma, q, steps, delta) audited.
        delta: the delta of the claim.
        wall_time_s: seconds for the whole audit (training included).
        score: the canary score used (``likelihood_ratio``, ``sum``, ``negative_loss``).
        noise_multiplier, sample_rate, steps: the mechanism's claimed parameters.
        grad_sample_mode: the engine mode audited.
        claim_p_value: `claim_p_value` of the claimed epsilon (the per-audit test; a family of audits adjusts it).
        epsilon_ceiling: `epsilon_ceiling` at (m, delta, confidence): the largest bound any outcome could give.
        privacy_unit: the audited trial's record, ``image`` or ``patient``: each canary is one such record, and the
            claim and the bound are epsilons per record (per patient for ``patient``).
    """

    kind: str
    m: int
    guesses: int
    correct: int
    epsilon_lower_bound: float
    confidence: float
    claimed_epsilon: float
    delta: float
    wall_time_s: float
    score: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    grad_sample_mode: str
    claim_p_value: float
    epsilon_ceiling: float
    privacy_unit: str = "image"

    @property
    def violates_claim(self) -> bool:
        """True when the bound exceeds the claimed epsilon: the claim is refuted at ``confidence`` (this audit
        alone; ``dpsweep audit`` decides on a family of audits by Holm's test of their ``claim_p_value``)."""
        return self.epsilon_lower_bound > self.claimed_epsilon

    def to_metrics(self) -> dict[str, float]:
        """Flat numeric metrics ``audit/<kind>/<name>`` for MLflow and the trial table."""
        values = {
            EPSILON_LOWER_BOUND: self.epsilon_lower_bound,
            CLAIMED_EPSILON: self.claimed_epsilon,
            CANARIES: self.m,
            GUESSES: self.guesses,
            CORRECT: self.correct,
            CONFIDENCE: self.confidence,
            WALL_TIME_S: self.wall_time_s,
            CLAIM_P_VALUE: self.claim_p_value,
            EPSILON_CEILING: self.epsilon_ceiling,
        }
        return {audit_metric(self.kind, name): float(value) for name, value in values.items()}


# ---------------------------------------------------------------------------------------------------------
# White-box Dirac canaries


@dataclass(frozen=True)
class DiracCanaries:
    """m Dirac gradient canaries: canary i is ``gradient_norm * e_j`` at coordinate ``flat_index[i]`` of
    parameter ``parameter[i]`` (names as in the unwrapped model's ``named_parameters()``)."""

    parameter: tuple[str, ...]
    flat_index: np.ndarray  # int64 [m], index into the parameter's flattened tensor
    gradient_norm: float

    def __len__(self) -> int:
        return len(self.parameter)

    def grad_samples(self, model: nn.Module, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Per-sample gradient rows of the canaries ``rows`` (indices into the m canaries), for
        ``private_step(extra_grad_samples=...)``: ``[len(rows), *shape]`` per parameter that holds one."""
        params = dict(model.named_parameters())
        out: dict[str, torch.Tensor] = {}
        for row, canary in enumerate(rows):
            name = self.parameter[canary]
            p = params[name]
            if name not in out:
                out[name] = torch.zeros((len(rows), p.numel()), dtype=p.dtype, device=p.device)
            out[name][row, int(self.flat_index[canary])] = self.gradient_norm
        return {name: flat.view(len(rows), *params[name].shape) for name, flat in out.items()}

    def read(self, model: nn.Module) -> np.ndarray:
        """Each canary's coordinate of ``p.grad`` (the noisy update after the step), float64 [m]."""
        params = dict(model.named_parameters())
        values = np.empty(len(self), dtype=np.float64)
        names = np.asarray(self.parameter)
        for name in dict.fromkeys(self.parameter):
            grad = params[name].grad
            if grad is None:
                raise RuntimeError(f"parameter {name} has no gradient after the step: the step did not run")
            where = np.flatnonzero(names == name)
            index = torch.as_tensor(self.flat_index[where], device=grad.device)
            values[where] = grad.detach().reshape(-1)[index].double().cpu().numpy()
        return values


def place_dirac_canaries(model: nn.Module, m: int, gradient_norm: float, seed: int = 0) -> DiracCanaries:
    """Distinct coordinates for m Dirac canaries, uniformly over all trainable coordinates (public rule:
    ``numpy.random.default_rng(seed)``; the coordinates need no secrecy, only the coins do)."""
    named = [(name, p.numel()) for name, p in model.named_parameters() if p.requires_grad]
    sizes = np.array([n for _, n in named], dtype=np.int64)
    total = int(sizes.sum())
    if not 1 <= m <= total:
        raise AuditError(
            f"m = {m}: white-box canaries need distinct coordinates of the model; choose 1 <= m <= {total} (its "
            "trainable values)"
        )
    flat = np.sort(np.random.default_rng(seed).choice(total, size=m, replace=False))
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    which = np.searchsorted(offsets, flat, side="right") - 1
    return DiracCanaries(
        parameter=tuple(named[i][0] for i in which),
        flat_index=flat - offsets[which],
        gradient_norm=float(gradient_norm),
    )


def check_auditable(privacy: PrivacyConfig) -> None:
    """Refuse to audit a config without a claim: non-private, or not planned (no sigma, q or steps).

    Raises:
        ValueError: which, and how to plan it.
    """
    if not privacy.is_private:
        raise ValueError("an audit needs a private trial (finite target epsilon); a non-private one has no claim")
    if not (privacy.noise_multiplier > 0 and 0 < privacy.sample_rate <= 1 and privacy.steps >= 1):
        raise ValueError(
            f"trial config has no calibrated mechanism (sigma={privacy.noise_multiplier}, q={privacy.sample_rate}, "
            f"steps={privacy.steps}); plan it as the sweep does (trainables.privacy.planning.plan_privacy) "
            "before auditing"
        )
