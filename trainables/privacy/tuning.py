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
steps)``. Per-trial epsilons are reported with the same accountant so that they compare like for like
with the tuning epsilon; they are within about 0.1% of Opacus's RDP epsilon that trials log (see
`accounting.cross_check_epsilon`).

**Trials with different mechanisms (random methods).** A sweep's grid points may differ in sigma (one
sigma per target epsilon), q or steps. The random-count theorems are about repeating *one* mechanism
Q. We take Q = "pick one of the given trials uniformly at random, independently of the data, then
train it and return (which trial, its output, its score)". Its RDP at every order alpha > 1 is at most
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

**Non-private trials.** A trial with sigma = 0 has no DP guarantee, and a release selected among
trials that include it is not DP either: its tuning epsilon is ``inf`` and `tuning_epsilon` says so.
With ``private_trials_only=True`` the non-private trials are left out and the result, labelled
"private trials only" in its sentence, is the cost of a search over the private trials alone: the
right number when the non-private baselines are reference points that are never candidates for
release (as in dpsweep's study), not when the released model may be a non-private one.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from dp_accounting import dp_event
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant, compute_epsilon
from dp_accounting.rdp import rdp_privacy_accountant as _rdp_internals

__all__ = [
    "DEFAULT_TNB_SHAPE",
    "TUNING_METHODS",
    "TrialMechanism",
    "TuningCost",
    "tuning_epsilon",
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
    """One trial's DP-SGD run, as accounted for: Poisson-sampled Gaussian steps on the private data.

    Attributes:
        noise_multiplier: sigma, noise standard deviation in units of the clip norm, >= 0; 0 means a
            non-private trial (infinite epsilon).
        sample_rate: q, the Poisson sampling probability of each example per step, in (0, 1].
        steps: number of DP-SGD steps of the trial, >= 1.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        sigma, q, steps = self.noise_multiplier, self.sample_rate, self.steps
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
        # Plain Python numbers inside (numpy scalars would leak into results and reprs).
        object.__setattr__(self, "noise_multiplier", float(sigma))
        object.__setattr__(self, "sample_rate", float(q))
        object.__setattr__(self, "steps", int(steps))

    @property
    def is_private(self) -> bool:
        """Whether the trial adds noise (sigma > 0) and so has a finite epsilon."""
        return self.noise_multiplier > 0

    def dp_event(self) -> dp_event.DpEvent:
        """The trial as a dp-accounting event (only for a private trial)."""
        return dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(self.sample_rate, dp_event.GaussianDpEvent(self.noise_multiplier)),
            self.steps,
        )


@dataclass(frozen=True)
class TuningCost:
    """The (epsilon, delta) of releasing the best trial after a search, next to the per-trial epsilon.

    Attributes:
        epsilon: epsilon of the released (best) trial after the whole search, dimensionless; ``inf``
            when a non-private trial is among the candidates.
        delta: the delta of that guarantee (the same delta as the per-trial guarantee).
        method: one of `TUNING_METHODS`.
        reference: the published result the bound comes from.
        n_trials: number of trials accounted for (private trials only when ``private_only``).
        expected_trials: expected number of training runs the method implies: ``n_trials`` for
            ``fixed``, the mean of the random count otherwise.
        shape: the truncated negative binomial's eta; ``inf`` for Poisson; None for ``fixed``.
        per_trial_epsilon: the largest single-trial epsilon at ``delta`` (same accountant).
        private_only: whether non-private trials were left out (``private_trials_only=True``).
        n_non_private_excluded: how many non-private trials were left out.
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
            e.g. seeds). For ``fixed`` these are exactly the trials run; for the random methods they
            define Q, which draws one of them uniformly at random per run.
        delta: delta of the (epsilon, delta) guarantee, in (0, 1); the sweep's delta, e.g. 6e-6.
        method: one of `TUNING_METHODS`.
        expected_trials: random methods only: E[T], the mean number of runs, finite and >= 1;
            defaults to ``len(trials)`` (counting only private trials when those alone are kept).
        shape: ``truncated_negative_binomial`` only: eta >= 0, finite (0 logarithmic, 1 geometric);
            defaults to `DEFAULT_TNB_SHAPE`. Smaller eta gives a smaller epsilon but a heavier tail of T.
        private_trials_only: leave non-private trials (sigma = 0) out and label the result "private
            trials only"; otherwise any non-private trial makes the tuning epsilon ``inf``.

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

    if len(private) < len(trials):
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
    """The trial's RDP at each of dp-accounting's default orders (read-only; cached: 0.1-0.2 s each)."""
    accountant = _accountant()
    accountant.compose(trial.dp_event())
    curve = accountant.rdp
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
    if n_non_private:
        return (
            f"Tuning cost ({search}): not DP (epsilon = inf): {n_non_private} of the {n_trials} trials are "
            "non-private and trained on the same data, so a trial selected among them has no privacy guarantee."
        )
    scope = ""
    if private_only:
        scope = "Private trials only"
        if n_excluded:
            scope += f" ({n_excluded} non-private trials excluded; a release selected among all trials is not DP)"
        scope += ". "
    return (
        f"{scope}Tuning cost ({search}): releasing the best trial after the whole search is "
        f"(epsilon={epsilon:.3g}, delta={delta:g})-DP; each trial alone is at most epsilon={per_trial:.3g}."
    )
