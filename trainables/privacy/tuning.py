"""The privacy cost of hyperparameter tuning: epsilon of releasing the best trial after a whole sweep.

Every trial of a sweep is DP-SGD on the *same* private training set, and the sweep then releases the
trial that scored best. A trial's own epsilon (`accounting.epsilon_spent`) covers that one training
run; it does not cover the selection, which looks at every trial. `tuning_epsilon` bounds the epsilon
of the released trial after the whole search, with one of three published methods (`TUNING_METHODS`):

* ``"fixed"`` (the default, and the only one that fits a grid sweep as dpsweep runs it): a fixed
  number k of trials. Releasing the best of them is post-processing of releasing all of them, so the
  bound is the RDP composition (Mironov 2017, Prop. 1) of the k trials' mechanisms, converted to
  (epsilon, delta). For k identical trials this equals one trial run for k times as many steps.
  It can be loose (releasing only the argmax may cost less), but it is the bound that holds for a
  fixed count: releasing only the best of a fixed number of runs can leak more than one run does
  (Papernot & Steinke 2022, Sec. 1), and the tighter selection bounds below need a random count.
* ``"truncated_negative_binomial"`` and ``"poisson"``: Papernot & Steinke, "Hyperparameter Tuning
  with Renyi Differential Privacy", ICLR 2022 (arXiv:2110.03620v2), Theorem 2 (truncated negative
  binomial number of runs, shape eta >= 0: eta = 0 logarithmic, eta = 1 geometric) and Theorem 6
  (Poisson number of runs). They hold only for a procedure that **draws the number of trials T at
  random** from that distribution (T >= 1 for the truncated negative binomial; T may be 0 for
  Poisson, releasing nothing), runs a mechanism Q independently T times on the same data and
  releases only the best run (its output and score; the other runs' outputs stay private). The
  cost then grows with log E[T] instead of linearly in T. **A fixed grid is not covered**: running
  exactly k trials is a different procedure, and quoting these bounds for it is wrong. They apply to
  a sweep that samples its trial count (Ray Tune ``num_samples`` drawn from the distribution, each
  trial's hyperparameters drawn at random).

The bounds are computed with Google's ``dp-accounting`` RDP accountant (``RdpAccountant``, its
default orders 1.1-10.9, 11-63, 128, 256, 512, 1024, add/remove adjacency), which implements both
theorems as ``RepeatAndSelectDpEvent``; we do not re-derive them. Trials are DP-SGD as in
`trainables.privacy.accounting`: ``steps`` Poisson-sampled Gaussian steps with sampling rate q and
noise multiplier sigma, event ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)),
steps)``, preceded, for a ``pos_weight: train`` trial, by its label-count release of noise multiplier
sigma_c: event ``ComposedDpEvent([GaussianDpEvent(sigma_c), <the steps>])``, as
`accounting.cross_check_epsilon` (each trial makes its own release, with fresh noise, so every trial's
release is composed). ``steps`` are the trial's **planned** steps: where a trial stops (ASHA, an error, a
kill) may depend on the data, so the bound fixed in advance composes the steps it could have taken.
Per-trial epsilons are reported with the same accountant so that they compare like for like with the
tuning epsilon; they are within about 0.1% of Opacus's RDP epsilon that trials log (see
`accounting.cross_check_epsilon`).

**Trials with different mechanisms (random methods).** A sweep's grid points may differ in sigma (one
sigma per target epsilon), q or steps. The random-count theorems are about repeating *one* mechanism
Q. We take Q = "pick one of the given trials uniformly at random, independently of the data, then
run it whole (its label-count release, if it makes one, and its training) and return (which trial, its
output, its score)": M_i below is trial i's whole mechanism, and its RDP curve eps_i is the release's
plus the steps' (composition). Its RDP at every order alpha > 1 is at most
the largest of the trials' RDPs at that order: with weights w_i = 1/k and outputs carrying the index
i (disjoint supports), for neighbouring datasets D, D',

    exp((alpha - 1) D_alpha(Q(D) || Q(D'))) = sum_i w_i exp((alpha - 1) D_alpha(M_i(D) || M_i(D')))
                                            <= exp((alpha - 1) max_i eps_i(alpha)),

in both orderings of (D, D'), since the weights do not depend on the data. Dropping the index is
post-processing and only lowers the divergence (equivalently: Renyi divergence is jointly quasi-convex,
van Erven & Harremoes 2014, Thm. 13). So the order-wise maximum of the trials' RDP curves is a valid
RDP curve for Q, and the theorems, which take Q's RDP at every order, apply to it. When one trial's
curve is that maximum at every order (e.g. equal q and steps: the smallest sigma dominates), Q is
accounted as that trial's event through ``RepeatAndSelectDpEvent``; otherwise the order-wise maximum
goes through the same dp-accounting routine that event uses (``_compute_rdp_repeat_and_select``,
private in dp-accounting 0.6; a test pins it to the public event path). Note that the random methods
then bound a search that draws its grid points at random (with repetition); the given trial list
defines the distribution Q draws from, not a schedule that is run.

**Adaptive search (Optuna), `adaptive_tuning_bound`.** The bounds above take the trials' mechanisms as
fixed before the search. Optuna picks each trial's (sigma, q, steps) from earlier trials' results, so the
mechanisms are themselves data-dependent, and composing the RDP curves of the trials that happened to run
is not a valid bound (adaptive composition of RDP needs each trial's RDP curve fixed in advance, Mironov
2017, Prop. 1; data-dependent budgets need a Renyi filter whose total is fixed in advance, Feldman & Zrnic
2021, "Individual privacy accounting via a Renyi filter"). The bound we report instead: every proposal a
cell can train lies in its `AdmissibleSet` (the search ranges cut by the feasibility check
``epsilon <= target``), so its RDP curve is at most the order-wise supremum over that set
(`worst_case_rdp_curve`, exhaustive over (q, steps) with certified brackets on the smallest feasible sigma,
`dominating_runs`); k trials compose to at most k copies of it, whatever rule picked them. The tests run an
adversary that picks, step by step, the admissible proposal that maximizes the composed epsilon: it never
exceeds the bound, and on optuna-smoke's ranges it spends far more than a benign realized search logs.
Beside it: `basic_composition_bound` (sum of the targets of the trials the search may train, a count
fixed in advance, k x delta; Dwork & Roth 2014, Thm. 3.16) and `advanced_composition_bound` (Dwork,
Rothblum & Vadhan 2010), both valid under adaptivity.

**Non-private trials.** A trial with sigma = 0 has no DP guarantee, and a release selected among
trials that include it is not DP either: its tuning epsilon is ``inf`` and `tuning_epsilon` says so.
With ``private_trials_only=True`` the non-private trials are left out and the result, labelled
"private trials only" in its sentence, is the cost of a search over the private trials alone: the
right number when the non-private baselines are reference points that are never candidates for
release (as in dpsweep's study), not when the released model may be a non-private one.

**Reproducible-noise trials.** A ``privacy.reproducible_noise`` trial adds noise, but its noise and
sampling replay from the seed logged with it, so its epsilon is no guarantee. Unlike a non-private
baseline it is a private candidate for selection, so it is never left out: any such trial makes the
tuning epsilon ``inf``, with ``private_trials_only`` or without, and the sentence says why.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from dp_accounting import dp_event
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant, compute_epsilon
from dp_accounting.rdp import rdp_privacy_accountant as _rdp_internals

__all__ = [
    "ADAPTIVE_METHODS",
    "AdmissibleSet",
    "DEFAULT_SIGMA_RTOL",
    "DEFAULT_TNB_SHAPE",
    "DominatingRun",
    "TUNING_METHODS",
    "TrialMechanism",
    "TuningBound",
    "TuningCost",
    "adaptive_tuning_bound",
    "advanced_composition_bound",
    "basic_composition_bound",
    "dominating_runs",
    "tuning_epsilon",
    "worst_case_rdp_curve",
]

_REFERENCES: dict[str, str] = {
    "fixed": "RDP composition of all trials (Mironov 2017, Prop. 1); best-of-k is post-processing",
    "truncated_negative_binomial": "Papernot & Steinke 2022 (arXiv:2110.03620), Theorem 2",
    "poisson": "Papernot & Steinke 2022 (arXiv:2110.03620), Theorem 6",
}

TUNING_METHODS: tuple[str, ...] = tuple(_REFERENCES)
"""Names of the tuning-cost methods: ``fixed`` count (composition) or a random count of trials."""

DEFAULT_TNB_SHAPE = 1.0
"""Default shape eta of the truncated negative binomial: 1 is the geometric distribution."""


@dataclass(frozen=True)
class TrialMechanism:
    """One trial as accounted for: its label-count release, if any, then Poisson-sampled Gaussian steps on the
    private data, at its **planned** steps (where a trial stops, early or by failure, may depend on the data).

    Attributes:
        noise_multiplier: sigma, noise standard deviation in units of the clip norm, >= 0; 0 means a
            non-private trial (infinite epsilon).
        sample_rate: q, the Poisson sampling probability of each example per step, in (0, 1].
        steps: number of DP-SGD steps of the trial, >= 1.
        label_count_noise_multiplier: sigma_c of the Gaussian label-count release a ``pos_weight: train`` trial
            makes before training (`trainables.privacy.label_counts`), or None (no release); a private trial only.
        reproducible_noise: the trial's noise and sampling replay from its logged seed (``privacy.reproducible_noise``,
            debugging): it adds noise and is a candidate for selection, but has no guarantee (infinite epsilon).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    label_count_noise_multiplier: float | None = None
    reproducible_noise: bool = False

    def __post_init__(self) -> None:
        sigma, q, steps = self.noise_multiplier, self.sample_rate, self.steps
        sigma_c = self.label_count_noise_multiplier
        if isinstance(sigma, bool) or not (isinstance(sigma, numbers.Real) and 0 <= sigma < math.inf):
            raise ValueError(
                f"noise_multiplier={sigma!r} must be a finite number >= 0 (noise std in units of the clip "
                "norm; 0 for a non-private trial)"
            )
        if isinstance(q, bool) or not (isinstance(q, numbers.Real) and 0 < q <= 1):
            raise ValueError(
                f"sample_rate={q!r} must be in (0, 1]: the Poisson sampling probability per step, "
                "e.g. expected_batch_size / n_train"
            )
        if isinstance(steps, bool) or not (isinstance(steps, numbers.Integral) and steps >= 1):
            raise ValueError(f"steps={steps!r} must be a whole number >= 1 of DP-SGD steps")
        if sigma_c is not None and (
            isinstance(sigma_c, bool) or not (isinstance(sigma_c, numbers.Real) and 0 < sigma_c < math.inf)
        ):
            raise ValueError(
                f"label_count_noise_multiplier={sigma_c!r} must be None (no label-count release) or a finite "
                "number > 0 (noise std of the released counts in units of their sensitivity)"
            )
        if sigma_c is not None and sigma == 0:
            raise ValueError(
                f"label_count_noise_multiplier={sigma_c!r} with noise_multiplier=0: a non-private trial makes no "
                "label-count release (it uses the exact counts); leave it None"
            )
        if not isinstance(self.reproducible_noise, bool | np.bool_):
            raise ValueError(f"reproducible_noise={self.reproducible_noise!r} must be True or False")
        # Plain Python numbers inside (numpy scalars would leak into results and reprs).
        object.__setattr__(self, "noise_multiplier", float(sigma))
        object.__setattr__(self, "sample_rate", float(q))
        object.__setattr__(self, "steps", int(steps))
        object.__setattr__(self, "label_count_noise_multiplier", None if sigma_c is None else float(sigma_c))
        object.__setattr__(self, "reproducible_noise", bool(self.reproducible_noise))

    @property
    def is_private(self) -> bool:
        """Whether the trial adds noise (sigma > 0): a private trial, a candidate of the private search (a
        ``reproducible_noise`` one included, though its epsilon is no guarantee)."""
        return self.noise_multiplier > 0

    @property
    def has_guarantee(self) -> bool:
        """Whether the trial's epsilon is a guarantee: private, with noise that does not replay from a logged seed."""
        return self.is_private and not self.reproducible_noise

    def dp_event(self) -> dp_event.DpEvent:
        """The trial as a dp-accounting event (only for a private trial): ``ComposedDpEvent([GaussianDpEvent(sigma_c),
        steps])`` with a label-count release (as `accounting.cross_check_epsilon`), the steps alone without."""
        steps = dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(self.sample_rate, dp_event.GaussianDpEvent(self.noise_multiplier)),
            self.steps,
        )
        if self.label_count_noise_multiplier is None:
            return steps
        return dp_event.ComposedDpEvent([dp_event.GaussianDpEvent(self.label_count_noise_multiplier), steps])


@dataclass(frozen=True)
class TuningCost:
    """The (epsilon, delta) of releasing the best trial after a search, next to the per-trial epsilon.

    Attributes:
        epsilon: epsilon of the released (best) trial after the whole search, dimensionless; ``inf``
            when a non-private or a ``reproducible_noise`` trial is among the candidates.
        delta: the delta of that guarantee (the same delta as the per-trial guarantee).
        method: one of `TUNING_METHODS`.
        reference: the published result the bound comes from.
        n_trials: number of trials accounted for (private trials only when ``private_only``).
        expected_trials: expected number of training runs the method implies: ``n_trials`` for
            ``fixed``, the mean of the random count otherwise.
        shape: the truncated negative binomial's eta; ``inf`` for Poisson; None for ``fixed``.
        per_trial_epsilon: the largest single-trial epsilon at ``delta`` (same accountant), label-count
            release included; ``inf`` when a candidate has no guarantee.
        private_only: whether non-private trials were left out (``private_trials_only=True``).
        n_non_private_excluded: how many non-private trials were left out.
        n_reproducible: how many candidates are ``reproducible_noise`` trials (each makes the epsilon ``inf``).
        sentence: one human sentence for the sweep summary, labelled with method and scope.
    """

    epsilon: float
    delta: float
    method: str
    reference: str
    n_trials: int
    expected_trials: float
    shape: float | None
    per_trial_epsilon: float
    private_only: bool
    n_non_private_excluded: int
    n_reproducible: int
    sentence: str


def tuning_epsilon(
    trials: Sequence[TrialMechanism],
    delta: float,
    method: str = "fixed",
    *,
    expected_trials: float | None = None,
    shape: float | None = None,
    private_trials_only: bool = False,
) -> TuningCost:
    """Epsilon of releasing the best trial of a hyperparameter search on one private dataset.

    See the module docstring for the methods, the theorems and their assumptions. In short:
    ``"fixed"`` is for a search that runs exactly the given trials (a grid sweep); the two random
    methods are valid only if the number of trials is drawn at random from their distribution and
    each run draws one of ``trials`` uniformly at random.

    Args:
        trials: the candidate trials' mechanisms, one per trial (repeat an entry for repeated runs,
            e.g. seeds), each with its label-count release. For ``fixed`` these are exactly the trials
            run, at their planned steps; for the random methods they define Q, which draws one of them
            uniformly at random per run and runs it whole (release and steps).
        delta: delta of the (epsilon, delta) guarantee, in (0, 1); the sweep's delta, e.g. 6e-6.
        method: one of `TUNING_METHODS`.
        expected_trials: random methods only: E[T], the mean number of runs, finite and >= 1;
            defaults to ``len(trials)`` (counting only private trials when those alone are kept).
        shape: ``truncated_negative_binomial`` only: eta >= 0, finite (0 logarithmic, 1 geometric);
            defaults to `DEFAULT_TNB_SHAPE`. Smaller eta gives a smaller epsilon but a heavier tail of T.
        private_trials_only: leave non-private trials (sigma = 0) out and label the result "private
            trials only"; otherwise any non-private trial makes the tuning epsilon ``inf``. A
            ``reproducible_noise`` trial is never left out (it is a private candidate): it makes the
            tuning epsilon ``inf`` either way.

    Returns:
        The `TuningCost`.

    Raises:
        ValueError: an unknown method, an empty or invalid trial list, delta outside (0, 1), a
            parameter given to a method that does not use it or outside its range, or no private
            trial left with ``private_trials_only=True``.
    """
    if method not in _REFERENCES:
        raise ValueError(f"method={method!r} is not a known tuning-cost method; choose one of {list(TUNING_METHODS)}")
    if isinstance(delta, bool) or not (isinstance(delta, numbers.Real) and 0 < delta < 1):
        raise ValueError(f"delta={delta!r} must be in (0, 1) and in practice well below 1/N, e.g. 6e-6")
    if isinstance(trials, TrialMechanism) or not isinstance(trials, Sequence):
        raise ValueError(f"trials={trials!r} must be a sequence of TrialMechanism, one per trial")
    for index, trial in enumerate(trials):
        if not isinstance(trial, TrialMechanism):
            raise ValueError(f"trials[{index}]={trial!r} is not a TrialMechanism(noise_multiplier, sample_rate, steps)")
    if not trials:
        raise ValueError("trials is empty: give at least one TrialMechanism")
    if not isinstance(private_trials_only, bool):
        raise ValueError(f"private_trials_only={private_trials_only!r} must be True or False")

    private = [trial for trial in trials if trial.is_private]
    n_excluded = len(trials) - len(private) if private_trials_only else 0
    if private_trials_only:
        if not private:
            raise ValueError(
                f"private_trials_only=True but all {len(trials)} trials are non-private (noise_multiplier=0): "
                "there is no private search to account for"
            )
        trials = private
    mean, shape = _method_parameters(method, len(trials), expected_trials, shape)
    n_reproducible = sum(trial.reproducible_noise for trial in private)

    if not all(trial.has_guarantee for trial in trials):
        epsilon = per_trial = math.inf
    else:
        per_trial = max(_epsilon(_rdp_curve(trial), delta) for trial in trials)
        epsilon = _tuning_epsilon_private(trials, delta, method, mean, shape)

    return TuningCost(
        epsilon=epsilon,
        delta=float(delta),
        method=method,
        reference=_REFERENCES[method],
        n_trials=len(trials),
        expected_trials=mean,
        shape=shape,
        per_trial_epsilon=per_trial,
        private_only=private_trials_only,
        n_non_private_excluded=n_excluded,
        n_reproducible=n_reproducible,
        sentence=_sentence(
            method,
            len(trials),
            mean,
            shape,
            epsilon,
            float(delta),
            per_trial,
            private_trials_only,
            n_excluded,
            n_non_private=len(trials) - len(private),
            n_reproducible=n_reproducible,
        ),
    )


def _method_parameters(
    method: str, n_trials: int, expected_trials: float | None, shape: float | None
) -> tuple[float, float | None]:
    """Validate and default (E[T], shape) for ``method``; raise ValueError naming the bad argument."""
    if method == "fixed":
        if expected_trials is not None:
            raise ValueError(
                f"expected_trials={expected_trials!r} does not apply to method='fixed', which runs exactly "
                f"len(trials)={n_trials} trials; leave it out or choose a random-count method"
            )
        if shape is not None:
            raise ValueError(f"shape={shape!r} applies only to method='truncated_negative_binomial'; leave it out")
        return float(n_trials), None
    if expected_trials is None:
        expected_trials = n_trials
    if isinstance(expected_trials, bool) or not (
        isinstance(expected_trials, numbers.Real) and 1 <= expected_trials < math.inf
    ):
        raise ValueError(
            f"expected_trials={expected_trials!r} must be a finite number >= 1: the mean number of trials "
            f"the {method} draw runs, e.g. the grid size {n_trials}"
        )
    if method == "poisson":
        if shape is not None:
            raise ValueError(f"shape={shape!r} applies only to method='truncated_negative_binomial'; leave it out")
        return float(expected_trials), math.inf
    if shape is None:
        shape = DEFAULT_TNB_SHAPE
    if isinstance(shape, bool) or not (isinstance(shape, numbers.Real) and 0 <= shape < math.inf):
        raise ValueError(
            f"shape={shape!r} must be a finite number >= 0 (eta of the truncated negative binomial: "
            "0 logarithmic, 1 geometric); use method='poisson' for the Poisson limit"
        )
    return float(expected_trials), float(shape)


def _accountant() -> RdpAccountant:
    return RdpAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)


@functools.lru_cache(maxsize=256)
def _rdp_curve(trial: TrialMechanism) -> np.ndarray:
    """The trial's RDP (label-count release included) at each of dp-accounting's default orders (read-only;
    cached: 0.1-0.2 s each)."""
    accountant = _accountant()
    accountant.compose(trial.dp_event())
    curve: np.ndarray = accountant.rdp
    curve.flags.writeable = False
    return curve


def _epsilon(rdp: np.ndarray, delta: float) -> float:
    epsilon, _ = compute_epsilon(np.asarray(_rdp_internals.DEFAULT_RDP_ORDERS), rdp, delta)
    return float(epsilon)


def _tuning_epsilon_private(
    trials: Sequence[TrialMechanism], delta: float, method: str, mean: float, shape: float | None
) -> float:
    """Tuning epsilon when every trial is private (finite RDP)."""
    accountant = _accountant()
    curves = [_rdp_curve(trial) for trial in trials]
    if method == "fixed":
        # What RdpAccountant does for ComposedDpEvent (RDP adds up), reusing the cached curves.
        return _epsilon(np.sum(curves, axis=0), delta)
    q_curve = np.max(curves, axis=0)  # order-wise max: Q's RDP (module docstring)
    dominant = next((i for i, curve in enumerate(curves) if np.array_equal(curve, q_curve)), None)
    if dominant is not None:
        accountant.compose(dp_event.RepeatAndSelectDpEvent(trials[dominant].dp_event(), mean, shape))
        return float(accountant.get_epsilon(delta))
    # No single trial dominates at every order: the same routine the event uses, on Q's curve.
    orders = accountant.orders
    rdp = _rdp_internals._compute_rdp_repeat_and_select(orders, q_curve, mean, shape)
    return float(compute_epsilon(orders, rdp, delta)[0])


def _sentence(
    method: str,
    n_trials: int,
    mean: float,
    shape: float | None,
    epsilon: float,
    delta: float,
    per_trial: float,
    private_only: bool,
    n_excluded: int,
    n_non_private: int,
    n_reproducible: int = 0,
) -> str:
    """One labelled sentence for the sweep summary."""
    if method == "fixed":
        search = f"a fixed search of {n_trials} trials, RDP composition"
    elif method == "poisson":
        search = f"a Poisson-distributed number of trials with mean {mean:g} (Papernot & Steinke 2022, Thm. 6)"
    else:
        search = (
            f"a truncated-negative-binomial number of trials (eta={shape:g}) with mean {mean:g} "
            "(Papernot & Steinke 2022, Thm. 2)"
        )
    scope = ""
    if private_only:
        scope = "Private trials only"
        if n_excluded:
            scope += f" ({n_excluded} non-private trials excluded; a release selected among all trials is not DP)"
        scope += ". "
    reasons = []
    if n_non_private:
        reasons.append(f"{n_non_private} of the {n_trials} trials are non-private")
    if n_reproducible:
        reasons.append(
            f"{n_reproducible} of the {n_trials} trials use reproducible_noise (their noise replays from the seed "
            "logged with them)"
        )
    if reasons:
        return (
            f"{scope}Tuning cost ({search}): not DP (epsilon = inf): {' and '.join(reasons)} and trained on the "
            "same data, so a trial selected among them has no privacy guarantee."
        )
    return (
        f"{scope}Tuning cost ({search}): releasing the best trial after the whole search is "
        f"(epsilon={epsilon:.3g}, delta={delta:g})-DP; each trial alone is at most epsilon={per_trial:.3g}."
    )


# --- Adaptive search (Optuna): a bound fixed before the search starts --------------------------------------

ADAPTIVE_METHODS: tuple[str, ...] = ("worst_case_rdp", "basic_composition", "advanced_composition")
"""Names of the tuning bounds that hold when each trial's mechanism is chosen from earlier trials' results."""

_ADAPTIVE_REFERENCES: dict[str, str] = {
    "worst_case_rdp": (
        "adaptive RDP composition of a per-trial RDP curve fixed in advance (Mironov 2017, Prop. 1; the "
        "fixed-budget condition of Feldman & Zrnic 2021, 'Individual privacy accounting via a Renyi filter')"
    ),
    "basic_composition": "basic composition under adaptivity (Dwork & Roth 2014, Thm. 3.16)",
    "advanced_composition": "advanced composition (Dwork, Rothblum & Vadhan 2010; Dwork & Roth 2014, Thm. 3.20)",
}

DEFAULT_SIGMA_RTOL = 1e-3
"""Relative width of the bracket on each (B, epochs) pair's smallest feasible sigma (`AdmissibleSet`)."""


@dataclass(frozen=True)
class TuningBound:
    """An (epsilon, delta) for all trials of an adaptive search, released together (the best one included).

    Attributes:
        method: one of `ADAPTIVE_METHODS`.
        epsilon: dimensionless; holds whatever rule picked each trial's mechanism from earlier results.
        delta: the delta of that guarantee.
        k: number of trials covered.
        description: one sentence for the sweep summary, with its citation.
    """

    method: str
    epsilon: float
    delta: float
    k: int
    description: str


@dataclass(frozen=True)
class AdmissibleSet:
    """Every DP-SGD run one Optuna cell can train: the search ranges cut by the feasibility check.

    Optuna proposes an expected batch size B (integer in ``expected_batch_size``), ``epochs`` (integer in
    ``epochs``) and sigma (real in ``noise_multiplier``); `sweeps.search` trains the proposal only if
    ``epsilon_spent(sigma, q(N, B), steps(N, B, epochs), delta, accountant) <= target_epsilon`` (with the
    label-count release when the trial makes one). Learning rate and clip norm do not change the
    mechanism's RDP (noise is sigma x C on a sum clipped to C). q and steps follow
    `accounting.sample_rate_and_steps`; N is public. N counts the cell's records: training images, or training
    patients for a patient-level cell (B is then in patients and the RDP is over patients).

    Attributes:
        n_records: N, the records of the cell's training set (images, or patients).
        target_epsilon: the cell's target, finite and > 0.
        delta: the sweep's delta.
        noise_multiplier: sigma's range (low, high), inclusive; low == high for a fixed value.
        expected_batch_size: B's range (low, high) of whole numbers, inclusive.
        epochs: the epochs' range (low, high) of whole numbers, inclusive.
        accountant: the trial's accountant (`accounting.ACCOUNTANTS`), which decides feasibility.
        label_count_noise_multiplier: sigma_c of each trial's label-count release, or None.
    """

    n_records: int
    target_epsilon: float
    delta: float
    noise_multiplier: tuple[float, float]
    expected_batch_size: tuple[int, int]
    epochs: tuple[int, int]
    accountant: str = "rdp"
    label_count_noise_multiplier: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.target_epsilon, numbers.Real) and 0 < self.target_epsilon < math.inf):
            raise ValueError(
                f"target_epsilon={self.target_epsilon!r} must be finite and > 0: a non-private cell has no bound"
            )
        for name, integral in (("noise_multiplier", False), ("expected_batch_size", True), ("epochs", True)):
            value = getattr(self, name)
            if not (isinstance(value, tuple) and len(value) == 2 and 0 < value[0] <= value[1] < math.inf) or (
                integral and not all(isinstance(v, numbers.Integral) for v in value)
            ):
                kind = "whole numbers" if integral else "numbers"
                raise ValueError(f"{name}={value!r} must be a (low, high) pair of {kind} with 0 < low <= high")
        if self.expected_batch_size[1] > self.n_records:
            raise ValueError(f"expected_batch_size={self.expected_batch_size!r} exceeds n_records={self.n_records}")


@dataclass(frozen=True)
class DominatingRun:
    """For one (q, steps) the admissible set contains: a sigma no larger than any feasible one.

    Attributes:
        sample_rate: q, shared by the batch sizes in ``batch_sizes``.
        steps: DP-SGD steps.
        epochs: the epochs giving ``steps``.
        batch_sizes: the (low, high) expected batch sizes with this q.
        noise_multiplier: the sigma whose RDP curve dominates every feasible run at (q, steps): the range's
            low end when that is feasible, else a sigma certified infeasible (epsilon above the target)
            within `DEFAULT_SIGMA_RTOL` of the smallest feasible one.
        feasible_noise_multiplier: a feasible sigma (epsilon <= target) at most rtol above it.
    """

    sample_rate: float
    steps: int
    epochs: int
    batch_sizes: tuple[int, int]
    noise_multiplier: float
    feasible_noise_multiplier: float


def _opacus_orders() -> np.ndarray:
    from opacus.accountants import RDPAccountant

    return np.asarray(RDPAccountant.DEFAULT_ALPHAS, dtype=np.float64)


def _opacus_rdp(sigma: float, q: float, steps: int, label_count_noise_multiplier: float | None) -> np.ndarray:
    """Opacus's RDP of the run (label-count release included) at its default orders, as its accountant sums it."""
    from opacus.accountants.analysis.rdp import compute_rdp

    orders = _opacus_orders()
    curves = []
    if label_count_noise_multiplier is not None:
        curves.append(compute_rdp(q=1.0, noise_multiplier=label_count_noise_multiplier, steps=1, orders=orders))
    curves.append(compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders))
    return np.asarray(sum(curves), dtype=np.float64)


def dominating_runs(admissible: AdmissibleSet, sigma_rtol: float = DEFAULT_SIGMA_RTOL) -> tuple[DominatingRun, ...]:
    """Runs whose RDP curves, together, dominate (order by order) every run in the admissible set.

    Exhaustive over the (q, steps) pairs, not a sample: batch sizes are grouped by their q (equal
    ``ceil(N / B)`` means the same mechanism), and every epochs value is visited except those proven
    dominated. Per pair, RDP decreases in sigma at every order (more noise is post-processing), so the
    smallest feasible sigma dominates; it is bracketed by bisection in log sigma with the trial's
    accountant, and the bracket's infeasible end is used (epsilon there is above the target and epsilon
    decreases in sigma, so no feasible sigma is smaller). Pruning, both by monotonicity in steps: at a
    fixed q, if the range's largest sigma is infeasible for ``e`` epochs it is for every ``e' > e``; if
    the smallest sigma is feasible for ``e`` epochs, the runs with ``e' < e`` epochs at that sigma have
    fewer steps and are dominated.

    Epsilon decreasing in sigma is exact for ``rdp`` (a minimum over orders of decreasing functions) and
    assumed for ``prv`` (its numerical upper bound). Cost: about 4 accountant evaluations per (q, epochs)
    pair (rdp: 0.02-0.08 s each; the optuna-smoke ranges, 168 pairs per cell, took 21 s and 56 s on a
    loaded 2-core machine; prv is 10-100x slower per evaluation).

    Returns:
        One `DominatingRun` per admissible (q, steps), in increasing batch size and epochs (cached per set).

    Raises:
        ValueError: no proposal of the ranges is feasible.
    """
    if not (isinstance(sigma_rtol, numbers.Real) and 0 < sigma_rtol < 1):
        raise ValueError(f"sigma_rtol={sigma_rtol!r} must be in (0, 1), e.g. 1e-3")
    return _dominating_runs(admissible, float(sigma_rtol))


@functools.lru_cache(maxsize=64)
def _dominating_runs(a: AdmissibleSet, sigma_rtol: float) -> tuple[DominatingRun, ...]:
    from trainables.privacy.accounting import epsilon_spent, sample_rate_and_steps

    sigma_low, sigma_high = float(a.noise_multiplier[0]), float(a.noise_multiplier[1])

    def epsilon(sigma: float, q: float, steps: int) -> float:
        return epsilon_spent(
            sigma, q, steps, a.delta, a.accountant, label_count_noise_multiplier=a.label_count_noise_multiplier
        )

    groups: dict[tuple[float, int], list[int]] = {}
    for batch_size in range(int(a.expected_batch_size[0]), int(a.expected_batch_size[1]) + 1):
        groups.setdefault(sample_rate_and_steps(a.n_records, batch_size, 1), []).append(batch_size)

    runs: list[DominatingRun] = []
    epochs_values = range(int(a.epochs[0]), int(a.epochs[1]) + 1)
    guesses: dict[int, float] = {}  # epochs -> the previous batch size's answer, a close starting point
    for (q, steps_per_epoch), batch_sizes in groups.items():
        found: list[DominatingRun] = []
        span = (batch_sizes[0], batch_sizes[-1])
        for epochs in reversed(epochs_values):  # largest first: a feasible low end prunes the smaller ones
            steps = epochs * steps_per_epoch
            result = _smallest_feasible(
                functools.partial(epsilon, q=q, steps=steps),
                a.target_epsilon,
                sigma_low,
                sigma_high,
                guesses.get(epochs),
                sigma_rtol,
            )
            if result is None:
                continue  # not admissible: even the largest sigma spends more than the target
            low, high = result
            if low == sigma_low:
                found.append(DominatingRun(q, steps, epochs, span, sigma_low, sigma_low))
                break
            guesses[epochs] = low
            found.append(DominatingRun(q, steps, epochs, span, low, high))
        runs.extend(reversed(found))
    if not runs:
        raise ValueError(
            f"no proposal of noise_multiplier={a.noise_multiplier}, expected_batch_size={a.expected_batch_size}, "
            f"epochs={a.epochs} is feasible at target_epsilon={a.target_epsilon:g}: the cell trains nothing"
        )
    return tuple(runs)


def _smallest_feasible(
    epsilon_at: Callable[[float], float],
    target: float,
    sigma_low: float,
    sigma_high: float,
    guess: float | None,
    rtol: float,
) -> tuple[float, float] | None:
    """Bracket the smallest sigma in [sigma_low, sigma_high] with ``epsilon_at(sigma) <= target``.

    Returns None when ``sigma_high`` is infeasible; ``(sigma_low, sigma_low)`` when ``sigma_low`` is feasible;
    else ``(infeasible, feasible)`` sigmas, both evaluated, with ratio <= 1 + rtol. Steps are secants of
    log epsilon against log sigma (starting from ``guess``, a neighbouring run's answer), each aimed just
    past the predicted crossing, with bisection as the fallback; every bracket end is an evaluated point,
    so the result never depends on the secant being right.
    """
    infeasible: float | None = None  # largest sigma seen with epsilon > target
    feasible: float | None = None  # smallest sigma seen with epsilon <= target
    points: list[tuple[float, float]] = []

    def probe(sigma: float) -> None:
        nonlocal infeasible, feasible
        value = epsilon_at(sigma)
        points.append((sigma, value))
        if value <= target:
            feasible = sigma if feasible is None else min(feasible, sigma)
        else:
            infeasible = sigma if infeasible is None else max(infeasible, sigma)

    sigma = guess if guess is not None else math.sqrt(sigma_low * sigma_high)
    for _ in range(60):
        probe(min(max(sigma, sigma_low), sigma_high))
        if feasible is not None and feasible <= sigma_low:
            return sigma_low, sigma_low
        if infeasible is not None and infeasible >= sigma_high:
            return None
        if feasible is not None and infeasible is not None and feasible / infeasible <= 1 + rtol:
            return infeasible, feasible
        sigma = _next_probe(points, target, infeasible, feasible, sigma_low, sigma_high, rtol)
    raise RuntimeError(f"bracketing the smallest feasible sigma did not converge: {points}")


def _next_probe(
    points: list[tuple[float, float]],
    target: float,
    infeasible: float | None,
    feasible: float | None,
    sigma_low: float,
    sigma_high: float,
    rtol: float,
) -> float:
    """Where `_smallest_feasible` evaluates next: a log-log secant through the last two points, aimed rtol/3
    past the crossing, kept strictly inside the current bracket (bisection when it would leave it)."""
    low = infeasible if infeasible is not None else sigma_low
    high = feasible if feasible is not None else sigma_high
    (s1, e1) = points[-1]
    if len(points) >= 2 and points[-2][1] != e1 and math.isfinite(points[-2][1]) and math.isfinite(e1):
        s0, e0 = points[-2]
        slope = (math.log(e1) - math.log(e0)) / (math.log(s1) - math.log(s0))
    else:
        slope = -1.5  # epsilon falls a little faster than 1/sigma near typical targets
    if slope < 0 and math.isfinite(e1) and e1 > 0:
        predicted = s1 * math.exp((math.log(target) - math.log(e1)) / slope)
        aimed = predicted * (1 + rtol / 3) if e1 > target else predicted * (1 - rtol / 3)
        if infeasible is None and aimed < low:
            return low  # the range's low end: feasible there means clamped
        if feasible is None and aimed > high:
            return high  # the range's high end: infeasible there means not admissible
        if low < aimed < high:
            return aimed
    if infeasible is None:
        return low
    if feasible is None:
        return high
    return math.sqrt(low * high)


def worst_case_rdp_curve(admissible: AdmissibleSet, sigma_rtol: float = DEFAULT_SIGMA_RTOL) -> np.ndarray:
    """Order-wise supremum of the RDP curves of every run in the admissible set, at Opacus's orders.

    The maximum over `dominating_runs` of their curves (Opacus's RDP of the sampled Gaussian mechanism,
    plus the label-count release when there is one): an upper bound on the RDP, at every order, of any
    proposal the cell can train, fixed before the search starts.
    """
    curves = [
        _opacus_rdp(run.noise_multiplier, run.sample_rate, run.steps, admissible.label_count_noise_multiplier)
        for run in dominating_runs(admissible, sigma_rtol)
    ]
    return np.asarray(np.max(curves, axis=0), dtype=np.float64)


def adaptive_tuning_bound(
    cells: Sequence[tuple[AdmissibleSet, int]], sigma_rtol: float = DEFAULT_SIGMA_RTOL
) -> TuningBound:
    """Epsilon of every trial of an adaptive search (Optuna) on one private dataset, the best one included.

    Optuna picks each trial's (sigma, q, steps) from earlier trials' results, so composing the RDP curves
    of the trials that happened to run is not a valid bound: adaptive composition needs each trial's RDP
    bound fixed before it runs (Mironov 2017, Prop. 1, whose mechanisms may be chosen adaptively but
    whose RDP orders-to-epsilon curves are fixed; Feldman & Zrnic 2021 show what a data-dependent
    choice of budgets needs instead: a Renyi filter with its budget fixed in advance). Here every trial of
    cell c is some run of its `AdmissibleSet` A_c, whose RDP at each order is at most the supremum over
    A_c (`worst_case_rdp_curve`), a curve fixed in advance; the trials' RDP therefore composes to at most
    ``sum_c k_c sup_{A_c}`` at every order, converted to (epsilon, delta) as Opacus does (Balle et al.
    2020, Thm. 21). Releasing any function of all trials (the best one) is post-processing.

    Args:
        cells: (admissible set, k) per cell of the dataset: k is a data-independent upper bound on the
            trials that cell trains (``optuna.trials_per_target``; trials that failed after touching the
            data count; proposals rejected by the feasibility check trained nothing and do not). The sets
            must share delta.
        sigma_rtol: see `dominating_runs`.

    Returns:
        The `TuningBound` (method ``worst_case_rdp``).
    """
    from opacus.accountants.analysis.rdp import get_privacy_spent

    if not cells:
        raise ValueError("cells is empty: give (AdmissibleSet, k) for each private cell of the dataset")
    deltas = {admissible.delta for admissible, _ in cells}
    if len(deltas) != 1:
        raise ValueError(f"the cells' deltas differ ({sorted(deltas)}); one bound needs one delta")
    total = np.zeros_like(_opacus_orders())
    k_total = 0
    for admissible, k in cells:
        if isinstance(k, bool) or not (isinstance(k, numbers.Integral) and k >= 0):
            raise ValueError(f"k={k!r} must be a whole number >= 0 of trials")
        if k:
            total = total + int(k) * worst_case_rdp_curve(admissible, sigma_rtol)
            k_total += int(k)
    delta = deltas.pop()
    epsilon = 0.0 if k_total == 0 else float(get_privacy_spent(orders=_opacus_orders(), rdp=total, delta=delta)[0])
    targets = ", ".join(f"{k} at target {a.target_epsilon:g}" for a, k in cells)
    return TuningBound(
        method="worst_case_rdp",
        epsilon=epsilon,
        delta=float(delta),
        k=k_total,
        description=(
            f"Adaptive search of {k_total} trials ({targets}): all of them together, the best one included, are "
            f"(epsilon={epsilon:.3g}, delta={delta:g})-DP whatever Optuna proposed, composing the worst RDP curve "
            "of every proposal the search ranges and the feasibility check admit "
            f"({_ADAPTIVE_REFERENCES['worst_case_rdp']})."
        ),
    )


def basic_composition_bound(targets: Sequence[float], delta: float) -> TuningBound:
    """(sum of targets, k x delta): basic composition of k trials, each (target, delta)-DP by construction.

    Valid for adaptively chosen mechanisms (Dwork & Roth 2014, Thm. 3.16). ``targets`` has one entry per
    trial the search may train, its cell's target epsilon: a count fixed in advance (each cell's
    ``optuna.trials_per_target``), not the trials that happened to run, since how many ran (an interrupted or
    failing search) may depend on the data. Every trial ends at or below its target with the same delta
    (label-count release included), so each is (target, delta)-DP.
    """
    _check_targets(targets, delta)
    k, epsilon = len(targets), float(sum(targets))
    return TuningBound(
        method="basic_composition",
        epsilon=epsilon,
        delta=k * float(delta),
        k=k,
        description=(
            f"Basic composition of {k} trials, each (target, delta={delta:g})-DP: (epsilon={epsilon:.4g}, "
            f"delta={k * delta:.3g}) ({_ADAPTIVE_REFERENCES['basic_composition']})."
        ),
    )


def advanced_composition_bound(targets: Sequence[float], delta: float, delta_slack: float | None = None) -> TuningBound:
    """Advanced composition of k adaptively chosen (epsilon_0, delta)-DP trials, epsilon_0 = the largest target.

    ``epsilon = sqrt(2 k ln(1 / delta')) epsilon_0 + k epsilon_0 (e^epsilon_0 - 1)`` at total delta
    ``k delta + delta'`` (Dwork, Rothblum & Vadhan 2010; Dwork & Roth 2014, Thm. 3.20); ``delta_slack`` is
    delta', by default the per-trial delta. Better than basic composition only for many trials at small
    epsilon_0; reported beside it, the smaller one may be quoted.
    """
    _check_targets(targets, delta)
    slack = float(delta) if delta_slack is None else float(delta_slack)
    if not 0 < slack < 1:
        raise ValueError(f"delta_slack={delta_slack!r} must be in (0, 1)")
    k, base = len(targets), float(max(targets))
    epsilon = math.sqrt(2 * k * math.log(1 / slack)) * base + k * base * math.expm1(base)
    return TuningBound(
        method="advanced_composition",
        epsilon=epsilon,
        delta=k * float(delta) + slack,
        k=k,
        description=(
            f"Advanced composition of {k} trials, each (epsilon <= {base:g}, delta={delta:g})-DP: (epsilon="
            f"{epsilon:.4g}, delta={k * delta + slack:.3g}) ({_ADAPTIVE_REFERENCES['advanced_composition']})."
        ),
    )


def _check_targets(targets: Sequence[float], delta: float) -> None:
    if not targets or not all(isinstance(t, numbers.Real) and 0 < t < math.inf for t in targets):
        raise ValueError(f"targets={targets!r} must be a non-empty list of finite target epsilons > 0, one per trial")
    if isinstance(delta, bool) or not (isinstance(delta, numbers.Real) and 0 < delta < 1):
        raise ValueError(f"delta={delta!r} must be in (0, 1)")
