"""Private selection: tuning whose privacy cost is the one reported (Papernot & Steinke, ICLR 2022, arXiv 2110.03620).

The procedure, per cell of a sweep: draw the number of runs K from a distribution fixed in advance, with secret
randomness (`TrialCount.draw`); run K independent trials, each with hyperparameters drawn at random (non-adaptively)
from the sweep's ranges; release only the best run (its output and its validation score). Theorems 2 (truncated
negative binomial K, shape eta: 0 logarithmic, 1 geometric) and 6 (Poisson K) bound the Renyi DP of the whole procedure
by that of one run plus a term growing with log E[K]; dp-accounting's ``RepeatAndSelectDpEvent`` implements both and
`trainables.privacy.tuning.tuning_epsilon` applies them to a set of candidate runs of different (sigma, q, steps) (the
order-wise maximum of their RDP curves, as its docstring proves).

The bound holds only for that procedure: K drawn in advance and kept secret (no output may reveal how many runs there
were), candidates drawn without looking at earlier results, every run to its planned steps (no early stopping), and
nothing but the winner released. `plan_selection` calibrates each candidate's noise so the **tuning-inclusive**
epsilon of the whole cell is at most its target: it finds the largest single-run epsilon whose candidates, each
calibrated to it (`trainables.privacy.planning.plan_privacy`), select to at most the target.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant as _rdp_internals

from trainables.config import PrivacyConfig
from trainables.privacy.accounting import MAX_NOISE_MULTIPLIER, epsilon_spent, probing
from trainables.privacy.planning import plan_privacy, schedule
from trainables.privacy.tuning import TrialMechanism, _epsilon, _rdp_curve, tuning_epsilon

__all__ = [
    "DISTRIBUTIONS",
    "SelectionPlan",
    "TrialCount",
    "plan_selection",
    "selection_epsilon",
    "plan_mechanisms",
    "selection_rdp_curve",
    "selection_rdp_epsilon",
]

Distribution = Literal["logarithmic", "geometric", "negative_binomial", "poisson"]
DISTRIBUTIONS: tuple[str, ...] = ("logarithmic", "geometric", "negative_binomial", "poisson")
_FIXED_SHAPES = {"logarithmic": 0.0, "geometric": 1.0, "poisson": math.inf}


@dataclass(frozen=True)
class TrialCount:
    """The distribution of a cell's number of runs K.

    Attributes:
        distribution: ``logarithmic`` (truncated negative binomial with eta = 0), ``geometric`` (eta = 1),
            ``negative_binomial`` (eta = ``shape``), or ``poisson`` (K may be 0: the cell then releases nothing).
        mean: E[K] (>= 1).
        shape: eta of ``negative_binomial`` (> 0); derived for the others.
    """

    distribution: Distribution
    mean: float
    shape: float | None = None

    def __post_init__(self) -> None:
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution={self.distribution!r} is not one of {DISTRIBUTIONS}")
        if isinstance(self.mean, bool) or not (isinstance(self.mean, numbers.Real) and 1 <= self.mean < 1e6):
            raise ValueError(f"mean={self.mean!r} must be a number in [1, 1e6): the expected number of runs")
        if self.distribution == "negative_binomial":
            if self.shape is None or not (0 < self.shape < math.inf):
                raise ValueError(f"shape={self.shape!r}: the negative binomial needs a finite shape eta > 0")
        elif self.shape is not None and self.shape != _FIXED_SHAPES[self.distribution]:
            raise ValueError(f"shape={self.shape!r} does not apply to {self.distribution} (its shape is fixed)")

    @property
    def dp_shape(self) -> float:
        """The shape dp-accounting's ``RepeatAndSelectDpEvent`` takes (0, 1, eta or infinity)."""
        if self.distribution == "negative_binomial" and self.shape is not None:  # __post_init__ requires it there
            return float(self.shape)
        return _FIXED_SHAPES[self.distribution]

    @property
    def gamma(self) -> float:
        """The truncated negative binomial's gamma for this mean (dp-accounting's own mapping); not for Poisson."""
        if self.distribution == "poisson":
            raise ValueError("a Poisson count has no gamma")
        return float(_rdp_internals._gamma_truncated_negative_binomial(self.dp_shape, float(self.mean)))

    def draw(self, rng: np.random.Generator) -> int:
        """One K. ``rng`` must be secret (seeded from the operating system, never logged): K is never released.

        Truncated negative binomial D_{eta, gamma}: P[K = k] proportional to (1 - gamma)^k C(k + eta - 1, k) for
        k >= 1 (eta = 0: (1 - gamma)^k / k, numpy's ``logseries``); drawn as numpy's negative binomial (failures
        before eta successes of probability gamma) conditioned on k >= 1. Poisson: ``rng.poisson(mean)``.
        """
        if self.distribution == "poisson":
            return int(rng.poisson(self.mean))
        gamma = self.gamma
        if self.distribution == "logarithmic":
            return int(rng.logseries(1 - gamma))
        if self.distribution == "geometric":
            return int(rng.geometric(gamma))
        while True:
            k = int(rng.negative_binomial(self.dp_shape, gamma))
            if k >= 1:
                return k


def selection_epsilon(candidates: Sequence[TrialMechanism], delta: float, count: TrialCount) -> float:
    """The tuning-inclusive epsilon of selecting the best of K runs, each a candidate drawn uniformly at random
    (`trainables.privacy.tuning.tuning_epsilon`, Papernot & Steinke's theorems on the candidates' order-wise maximal RDP
    curve), at ``delta``."""
    method = "poisson" if count.distribution == "poisson" else "truncated_negative_binomial"
    shape = None if method == "poisson" else count.dp_shape
    return tuning_epsilon(list(candidates), delta, method, expected_trials=count.mean, shape=shape).epsilon


@dataclass(frozen=True)
class SelectionPlan:
    """A cell's calibrated private selection.

    Attributes:
        epsilon: the tuning-inclusive epsilon of the whole cell (at most its target).
        single_run_epsilon: the epsilon each candidate run was calibrated to alone.
        candidates: (expected batch size, epochs) -> that candidate's planned privacy config (sigma, q, steps).
        count: the distribution of K.
    """

    epsilon: float
    single_run_epsilon: float
    candidates: dict[tuple[int, int], PrivacyConfig]
    count: TrialCount


def _lowest_reachable(privacy: PrivacyConfig, n_records: int, shapes: Sequence[tuple[int, int]]) -> float:
    """The smallest single-run epsilon every candidate can be calibrated to: a little above the accountant's floor (its
    epsilon at the largest noise calibration tries, which RDP's conversion keeps above 0) plus the tolerance."""
    floor = 0.0
    for batch, epochs in shapes:
        shaped = dataclasses.replace(privacy, expected_batch_size=batch, epochs=epochs)
        q, steps = schedule(shaped, n_records)
        with probing():  # at the noisiest sigma the optimal order is the largest, by design
            epsilon = epsilon_spent(
                MAX_NOISE_MULTIPLIER / 2,
                q,
                steps,
                privacy.delta,
                privacy.accountant,
                label_count_noise_multiplier=privacy.label_count_noise_multiplier,
            )
        floor = max(floor, epsilon)
    return max(2 * privacy.calibration_tolerance, 1.01 * floor + privacy.calibration_tolerance)


def _mechanism(privacy: PrivacyConfig) -> TrialMechanism:
    return TrialMechanism(
        privacy.noise_multiplier,
        privacy.sample_rate,
        privacy.steps,
        label_count_noise_multiplier=privacy.label_count_noise_multiplier,
        reproducible_noise=privacy.reproducible_noise,
    )


def plan_selection(
    privacy: PrivacyConfig,
    n_records: int,
    shapes: Sequence[tuple[int, int]],
    count: TrialCount,
    *,
    cache_path: Path | None = None,
    iterations: int = 30,
) -> SelectionPlan:
    """Calibrate a cell's private selection so its tuning-inclusive epsilon is at most ``privacy.target_epsilon``.

    Every candidate shape (expected batch size B, epochs E) is planned for N records at one single-run epsilon
    (`plan_privacy`, the sweep's accountant and tolerance); bisection on that epsilon finds the largest whose
    selection epsilon (`selection_epsilon`) is at most the target. The single-run epsilon is then well below the
    target (Papernot & Steinke: about x0.6-0.8 at E[K] = 10), so each candidate needs more noise than a lone trial.

    Raises:
        ValueError: a non-private config, no shapes, or a target that even the noisiest plan cannot meet.
    """
    if not privacy.is_private:
        raise ValueError("private selection needs a finite target epsilon")
    if not shapes:
        raise ValueError("give at least one (expected_batch_size, epochs) candidate shape")
    target, tolerance = privacy.target_epsilon, privacy.calibration_tolerance

    def planned(single: float) -> dict[tuple[int, int], PrivacyConfig]:
        # A candidate's single-run epsilon is a search step (from the floor up), never reported: the cell's
        # reported epsilon is the selection's, dp-accounting's over its own orders (`selection_epsilon`).
        with probing():
            return {
                (b, e): plan_privacy(
                    dataclasses.replace(privacy, target_epsilon=single, expected_batch_size=b, epochs=e),
                    n_records,
                    cache_path=cache_path,
                )
                for b, e in dict.fromkeys(shapes)
            }

    def selected(plans: dict[tuple[int, int], PrivacyConfig]) -> float:
        return selection_epsilon([_mechanism(p) for p in plans.values()], privacy.delta, count)

    low, high = _lowest_reachable(privacy, n_records, shapes), target
    if low >= target:
        raise ValueError(
            f"target_epsilon={target:g} is below what the {privacy.accountant} accountant can report at "
            f"delta={privacy.delta:g} for these runs ({low:.4g}); raise the target or delta"
        )
    best_plans = planned(low)
    best_epsilon = selected(best_plans)
    if best_epsilon > target:
        raise ValueError(
            f"target_epsilon={target:g} cannot hold for a private selection with E[K]={count.mean:g} "
            f"({count.distribution}): even single runs at epsilon {low:g} select to {best_epsilon:.4g}; raise the "
            "target or lower the mean number of trials"
        )
    best_single = low
    for _ in range(iterations):
        if high - low < tolerance / 4:
            break
        middle = (low + high) / 2
        plans = planned(middle)
        epsilon = selected(plans)
        if epsilon <= target:
            low, best_single, best_plans, best_epsilon = middle, middle, plans, epsilon
        else:
            high = middle
    return SelectionPlan(best_epsilon, best_single, best_plans, count)


def selection_rdp_curve(candidates: Sequence[TrialMechanism], count: TrialCount) -> np.ndarray:
    """The RDP curve of a cell's whole selection at dp-accounting's default orders: Papernot & Steinke's bound on the
    candidates' order-wise maximal curve (`selection_epsilon` before its conversion to epsilon)."""
    q_curve = np.max([_rdp_curve(m) for m in candidates], axis=0)
    orders = np.asarray(_rdp_internals.DEFAULT_RDP_ORDERS)
    curve: np.ndarray = _rdp_internals._compute_rdp_repeat_and_select(orders, q_curve, count.mean, count.dp_shape)
    return curve


def selection_rdp_epsilon(cells: Sequence[tuple[Sequence[TrialMechanism], TrialCount]], delta: float) -> float:
    """Epsilon at ``delta`` of releasing every cell's winner, each cell given by its candidates and its count: the RDP
    composition of the cells' selections (one cell: its `selection_epsilon`)."""
    return _epsilon(np.sum([selection_rdp_curve(c, count) for c, count in cells], axis=0), delta)


def plan_mechanisms(plan: SelectionPlan) -> list[TrialMechanism]:
    """A calibrated cell's candidate mechanisms (one per shape)."""
    return [_mechanism(p) for p in plan.candidates.values()]
