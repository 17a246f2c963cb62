"""Privacy accounting for DP-SGD: epsilon spent, noise calibration, an independent cross-check.

The mechanism accounted for everywhere in this module is DP-SGD as Opacus runs it:

* **Poisson sampling**: at each step every training example joins the batch independently with
  probability ``sample_rate`` (q), so batch sizes vary (see `sample_rate_and_steps`).
* **Per-sample clipping** to L2 norm C and **Gaussian noise** N(0, (sigma * C)^2) added to the sum
  of clipped gradients; ``noise_multiplier`` is sigma, the noise standard deviation in units of C.
* **``steps`` identical steps** (same sigma and q), composed.
* **Add/remove adjacency, N public**: neighbouring datasets differ by adding or removing one example,
  and the number of examples N is treated as public (q and the step count are derived from it and
  released). The privacy unit is whatever one dataset row is (one image in dpsweep by default). A
  public N strictly only fits neighbours of the same size, i.e. **replace-one** adjacency, under which
  one record can move the clipped sum by 2C: `replace_one_epsilon` gives the same run's epsilon read
  that way (dp-accounting PLD), reported beside the add/remove epsilon and never used to calibrate
  (smoke sweep, delta 6e-6: targets 1, 3, 8 read 1.378, 2.968, 7.351).
* **(epsilon, delta)-DP**: epsilon is dimensionless (natural-log scale); delta is a probability,
  which must be well below 1/N for the guarantee to mean anything (`validate_privacy_parameters`).

Epsilon is an *input* of a trial: `calibrate_noise_multiplier` finds the smallest sigma whose
epsilon after the planned steps does not exceed the target, and `epsilon_spent` reports the epsilon
of any prefix of training. Both use the same Opacus accountant, so the trajectory ends at (not over)
the target. `cross_check_epsilon` recomputes epsilon with Google's ``dp-accounting`` package;
`replace_one_epsilon` reads the same run under replace-one adjacency.

Accountants (`ACCOUNTANTS`), both upper bounds on the true epsilon:

* ``"rdp"``: Renyi DP of the sampled Gaussian mechanism (Mironov, Talwar, Zhang 2019) converted to
  (epsilon, delta) with Balle et al. 2020 Thm. 21, minimised over Opacus's 150 default orders
  (1.1-10.9 in steps of 0.1, then 12-63). Deterministic; 0.02-0.08 s per evaluation.
* ``"prv"``: numerical composition of privacy loss random variables (Gopi et al. 2021) with Opacus's
  defaults ``eps_error=0.01``, ``delta_error=delta/1000``; returns the upper end of its error band.
  Tighter (8-16% less epsilon for the same sigma, 3-8% less sigma for the same target at the smoke
  and study scales) but 0.15-9 s per evaluation, growing with steps and epsilon. It composes one
  ordering (the remove direction) of the add/remove pair; dp-accounting's PLD over both directions
  stays below it at the smoke and study scales (checked in tests).

**One extra Gaussian release (``label_count_noise_multiplier``).** A trial with ``training.pos_weight: train``
first releases its per-label positive counts through a Gaussian mechanism (`trainables.privacy.label_counts`)
with noise std ``label_count_noise_multiplier * sensitivity``: accounted as one Gaussian mechanism of noise
multiplier sigma_c, sampling rate 1, one step, i.e. Opacus history entry ``(sigma_c, 1.0, 1)`` and
dp-accounting's ``GaussianDpEvent(sigma_c)``, composed with the DP-SGD steps (RDP adds up; PRV and PLD
convolve). `epsilon_spent`, `calibrate_noise_multiplier` and `cross_check_epsilon` take it as a keyword, so
calibration makes the *total* end at (not over) the target. `accountant_history` is the exact ledger.

Opacus's ``"gdp"`` accountant is left out on purpose: it is a central-limit approximation, not an
upper bound.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant

if TYPE_CHECKING:
    from dp_accounting import dp_event

__all__ = [
    "ACCOUNTANTS",
    "CalibrationCacheWarning",
    "LABEL_COUNT_SAMPLE_RATE",
    "MAX_NOISE_MULTIPLIER",
    "accountant_history",
    "calibrate_noise_multiplier",
    "check_ledger",
    "cross_check_epsilon",
    "epsilon_spent",
    "replace_one_epsilon",
    "sample_rate_and_steps",
    "validate_privacy_parameters",
]

LABEL_COUNT_SAMPLE_RATE = 1.0
"""Sampling rate of the label-count release in the accountant's history: every record is counted, once."""

_ACCOUNTANT_CLASSES: dict[str, type[IAccountant]] = {"rdp": RDPAccountant, "prv": PRVAccountant}

ACCOUNTANTS: tuple[str, ...] = tuple(_ACCOUNTANT_CLASSES)
"""Names of the Opacus accountants a sweep may choose (``accountant:`` in a sweep spec)."""

MAX_NOISE_MULTIPLIER = 1e6
"""Calibration gives up above this sigma: the target epsilon is then unreachable in practice."""

_CACHE_FORMAT = "dpsweep/noise-multiplier-cache"
_CACHE_VERSION = 1
# Below this relative width of the sigma bracket, bisection cannot make progress in float64.
_MIN_RELATIVE_BRACKET = 1e-13


class CalibrationCacheWarning(UserWarning):
    """The noise-multiplier cache file was unreadable or held an invalid entry and is being rebuilt."""


def create_accountant(accountant: str) -> IAccountant:
    """Look up an Opacus accountant by name in the registry.

    Raises:
        ValueError: ``accountant`` is not one of `ACCOUNTANTS`.
    """
    try:
        accountant_class = _ACCOUNTANT_CLASSES[accountant]
    except (KeyError, TypeError):
        raise ValueError(
            f"accountant={accountant!r} is not a known accountant; choose one of {list(ACCOUNTANTS)}"
        ) from None
    return accountant_class()


def _check_run(sample_rate: float, steps: int, delta: float) -> None:
    """Raise ValueError naming the first of q, steps, delta outside the accountants' domain."""
    if not (isinstance(sample_rate, numbers.Real) and 0 < sample_rate <= 1):
        raise ValueError(
            f"sample_rate={sample_rate!r} must be in (0, 1]: the Poisson sampling probability per step, "
            "e.g. expected_batch_size / n_train"
        )
    if not (isinstance(steps, numbers.Integral) and steps >= 0):
        raise ValueError(f"steps={steps!r} must be a whole number >= 0 of DP-SGD steps")
    if not (isinstance(delta, numbers.Real) and 0 < delta < 1):
        raise ValueError(f"delta={delta!r} must be in (0, 1) and in practice well below 1/N, e.g. 6e-6")


def _check_noise_multiplier(noise_multiplier: float) -> None:
    """Raise ValueError unless sigma is a finite number >= 0."""
    if not (isinstance(noise_multiplier, numbers.Real) and 0 <= noise_multiplier < math.inf):
        raise ValueError(
            f"noise_multiplier={noise_multiplier!r} must be a finite number >= 0 (noise std in units of the clip norm)"
        )


def _check_label_count_noise_multiplier(label_count_noise_multiplier: float | None) -> None:
    """Raise ValueError unless sigma_c is None (no label-count release) or a finite number > 0."""
    if label_count_noise_multiplier is None:
        return
    if isinstance(label_count_noise_multiplier, bool) or not (
        isinstance(label_count_noise_multiplier, numbers.Real) and 0 < label_count_noise_multiplier < math.inf
    ):
        raise ValueError(
            f"label_count_noise_multiplier={label_count_noise_multiplier!r} must be None (no label-count release) "
            "or a finite number > 0 (noise std of the released counts in units of their L2 sensitivity)"
        )


def accountant_history(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    label_count_noise_multiplier: float | None = None,
) -> list[tuple[float, float, int]]:
    """The Opacus accountant history (the privacy ledger) of a trial after ``steps`` DP-SGD steps.

    Entries are ``(noise multiplier, sampling rate, steps)``, in the order Opacus records them: first the
    label-count release ``(sigma_c, 1.0, 1)`` when there is one (it happens once, before training), then
    the DP-SGD steps ``(sigma, q, steps)`` (absent while ``steps == 0``). Opacus's ``step`` merges a step
    into the last entry when sigma and q are equal, so in the corner case ``sigma_c == sigma`` and
    ``q == 1`` the two become one entry ``(sigma, 1.0, steps + 1)``, as here. A restored trial's
    ``accountant.history`` must equal this list exactly (entries compared as plain float, float, int).

    Args:
        noise_multiplier: sigma of DP-SGD.
        sample_rate: q of DP-SGD.
        steps: DP-SGD steps taken, >= 0.
        label_count_noise_multiplier: sigma_c of the label-count release, or None when there is none.
    """
    _check_label_count_noise_multiplier(label_count_noise_multiplier)
    history: list[tuple[float, float, int]] = []
    if label_count_noise_multiplier is not None:
        history.append((float(label_count_noise_multiplier), LABEL_COUNT_SAMPLE_RATE, 1))
    if steps:
        entry = (float(noise_multiplier), float(sample_rate))
        if history and history[-1][:2] == entry:
            history[-1] = (*entry, history[-1][2] + int(steps))
        else:
            history.append((*entry, int(steps)))
    return history


def check_ledger(
    history: list[tuple[float, float, int]],
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    label_count_noise_multiplier: float | None = None,
) -> None:
    """Raise ValueError unless an accountant's history is exactly the trial's ledger (`accountant_history`).

    A restored trial must account for exactly the steps it took at its (sigma, q), preceded by its one
    label-count release when it makes one: a lost, doubled or foreign entry would misreport epsilon.

    Args:
        history: ``accountant.history`` (entries as tuples or lists of sigma, q, steps).
        noise_multiplier, sample_rate, steps, label_count_noise_multiplier: as `accountant_history`.
    """
    recorded = [(float(sigma), float(q), int(n)) for sigma, q, n in history]
    expected = accountant_history(noise_multiplier, sample_rate, steps, label_count_noise_multiplier)
    if recorded != expected:
        raise ValueError(
            f"privacy ledger records {recorded} but the trial's {steps} steps at (sigma={noise_multiplier}, "
            f"q={sample_rate})"
            + (
                f" after its label-count release (sigma_c={label_count_noise_multiplier})"
                if label_count_noise_multiplier is not None
                else ""
            )
            + f" are {expected}; refusing to continue with an inconsistent ledger"
        )


def epsilon_spent(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
    *,
    label_count_noise_multiplier: float | None = None,
) -> float:
    """Epsilon of DP-SGD after ``steps`` Poisson-sampled Gaussian steps, from an Opacus accountant.

    This is exactly the value Opacus's ``PrivacyEngine.get_epsilon(delta)`` reports after ``steps``
    optimizer steps with this sigma and q (same accountant class, same history, same defaults), when the
    accountant's history also holds the label-count release (`accountant_history`).

    Args:
        noise_multiplier: sigma, the noise standard deviation divided by the clip norm C.
        sample_rate: q, the Poisson sampling probability of each example per step, in (0, 1].
        steps: number of DP-SGD steps taken so far, >= 0.
        delta: the delta of the (epsilon, delta) guarantee, in (0, 1).
        accountant: one of `ACCOUNTANTS`.
        label_count_noise_multiplier: sigma_c of a Gaussian release of the label counts made before
            training (``pos_weight: train``), composed with the steps; None when there is none.

    Returns:
        Epsilon (dimensionless) under add/remove adjacency; 0.0 when nothing was released (``steps == 0``
        and no label-count release) and ``inf`` for ``noise_multiplier == 0`` with at least one step.

    Raises:
        ValueError: an argument is outside its domain or the accountant is unknown.
    """
    opacus_accountant = create_accountant(accountant)
    _check_noise_multiplier(noise_multiplier)
    _check_run(sample_rate, steps, delta)
    _check_label_count_noise_multiplier(label_count_noise_multiplier)
    if steps == 0 and label_count_noise_multiplier is None:
        return 0.0
    if noise_multiplier == 0 and steps > 0:
        return math.inf
    opacus_accountant.history = accountant_history(noise_multiplier, sample_rate, steps, label_count_noise_multiplier)
    # PRV evaluates log(1 - q) = -inf for the release's q = 1, which its formulas handle (t > -inf everywhere).
    with np.errstate(divide="ignore"):
        return float(opacus_accountant.get_epsilon(delta=delta))


@contextmanager
def probing() -> Iterator[None]:
    """Opacus' "Optimal order is the smallest/largest alpha" warning off inside the block, for probes whose epsilon
    is a search step and never reported: calibration's bisection tries sigmas far from the answer; a selection's floor
    is the epsilon at the noisiest sigma calibration tries, where the optimal order is the largest by design, and its
    candidates' single-run calibrations are steps of its own search (`trainables.privacy.selection`, whose reported
    epsilon is dp-accounting's). A lone trial's calibrated epsilon is recomputed outside, warning and all."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the (smallest|largest) alpha")
        yield


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    tolerance: float = 0.01,
    cache_path: Path | None = None,
    *,
    label_count_noise_multiplier: float | None = None,
) -> float:
    """Smallest noise multiplier, to ``tolerance`` in epsilon, that keeps ``steps`` steps within budget.

    Bisection on `epsilon_spent` itself (so the answer is exact with respect to the epsilon a trial
    reports): the returned sigma satisfies

        target_epsilon - tolerance <= epsilon_spent(sigma, sample_rate, steps, delta, ...) <= target_epsilon.

    With ``label_count_noise_multiplier`` the epsilon is that of the label-count release composed with
    the steps, so the *total* ends at the target; the release alone must then spend less than the target.

    The upper bound is a guarantee: it is re-checked by recomputing epsilon before returning. The lower
    bound means sigma is not more than ``tolerance`` (in epsilon) noisier than needed. Bracketing starts
    at sigma = 1 and doubles until epsilon <= target; bisection keeps the invariant
    ``epsilon(sigma_high) <= target < epsilon(sigma_low)``.

    Args:
        target_epsilon: the epsilon to end at after ``steps`` steps, > 0; ``inf`` for a non-private
            baseline (returns 0.0, no noise).
        delta: the delta of the guarantee, in (0, 1).
        sample_rate: q, the Poisson sampling probability per step, in (0, 1].
        steps: planned number of DP-SGD steps, >= 1 (see `sample_rate_and_steps`).
        accountant: one of `ACCOUNTANTS`; report epsilon with the same one.
        tolerance: how far below the target the calibrated epsilon may end, in epsilon units,
            in (0, target_epsilon).
        cache_path: optional JSON file caching results per (target_epsilon, delta, sample_rate, steps,
            accountant, tolerance, Opacus version). Writes are atomic (temporary file + rename), so
            concurrent writers never leave a partial file; a concurrent write may drop another
            writer's new entry, which only costs a recomputation. An unreadable file or an invalid
            entry raises a `CalibrationCacheWarning` and is rebuilt, never trusted.
        label_count_noise_multiplier: sigma_c of the label-count release composed with the steps
            (``pos_weight: train``), or None; part of the cache key when given.

    Returns:
        sigma, the noise standard deviation in units of the clip norm.

    Raises:
        ValueError: an argument is outside its domain, the label-count release alone spends the target,
            or the target needs sigma above `MAX_NOISE_MULTIPLIER`.
        RuntimeError: epsilon jumps over the tolerance band (the accountant is not continuous there),
            or the recomputed epsilon exceeds the target (a bug; the result is withheld).
    """
    create_accountant(accountant)
    if not (isinstance(target_epsilon, numbers.Real) and target_epsilon > 0):
        raise ValueError(f"target_epsilon={target_epsilon!r} must be > 0 (use inf for a non-private baseline)")
    if math.isinf(target_epsilon):
        return 0.0
    _check_run(sample_rate, steps, delta)
    _check_label_count_noise_multiplier(label_count_noise_multiplier)
    if steps < 1:
        raise ValueError(f"steps={steps!r} must be >= 1 to calibrate noise for a training run")
    if not (isinstance(tolerance, numbers.Real) and 0 < tolerance < target_epsilon):
        raise ValueError(f"tolerance={tolerance!r} must be in (0, target_epsilon={target_epsilon!r}); e.g. 0.01")
    # Plain floats and ints from here on: numpy scalars would change the cache keys' JSON.
    target_epsilon, delta, sample_rate = float(target_epsilon), float(delta), float(sample_rate)
    steps, tolerance = int(steps), float(tolerance)
    count_sigma = None if label_count_noise_multiplier is None else float(label_count_noise_multiplier)
    if count_sigma is not None:
        with probing():  # a check against the target (one tiny release: the largest order by design), not reported
            release_alone = epsilon_spent(
                1.0, sample_rate, 0, delta, accountant, label_count_noise_multiplier=count_sigma
            )
        if not release_alone < target_epsilon - tolerance:
            raise ValueError(
                f"the label-count release (training.pos_weight: train) alone spends epsilon {release_alone:.4g} at "
                f"privacy.label_count_noise_multiplier={count_sigma!r}, leaving nothing of target_epsilon="
                f"{target_epsilon!r} for training; raise privacy.label_count_noise_multiplier, or use "
                "training.pos_weight: uniform"
            )

    key = _cache_key(target_epsilon, delta, sample_rate, steps, accountant, tolerance, count_sigma)
    if cache_path is not None:
        cached = _cached_noise_multiplier(Path(cache_path), key, target_epsilon, tolerance)
        if cached is not None:
            return cached

    def epsilon_at(sigma: float) -> float:
        return epsilon_spent(sigma, sample_rate, steps, delta, accountant, label_count_noise_multiplier=count_sigma)

    with probing():  # the final recomputation below is not silenced
        sigma = _bisect_noise_multiplier(epsilon_at, target_epsilon, tolerance)

    epsilon = epsilon_at(sigma)
    if not epsilon <= target_epsilon:
        raise RuntimeError(
            f"calibration bug: sigma={sigma!r} recomputes to epsilon={epsilon!r} > target_epsilon="
            f"{target_epsilon!r} ({accountant}, q={sample_rate!r}, steps={steps}, delta={delta!r}); "
            "refusing to return a noise multiplier that breaks the privacy budget"
        )
    if cache_path is not None:
        _store_noise_multiplier(Path(cache_path), key, sigma, epsilon)
    return sigma


def _bisect_noise_multiplier(epsilon_at: Callable[[float], float], target_epsilon: float, tolerance: float) -> float:
    """Bisection for `calibrate_noise_multiplier`, given epsilon as a decreasing function of sigma."""
    sigma_low = 0.0  # epsilon(0) = inf > target
    sigma_high = 1.0
    epsilon_high = epsilon_at(sigma_high)
    while epsilon_high > target_epsilon:
        sigma_low, sigma_high = sigma_high, 2 * sigma_high
        if sigma_high > MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"target_epsilon={target_epsilon!r} is unreachable: even noise_multiplier="
                f"{MAX_NOISE_MULTIPLIER:g} spends more; raise target_epsilon or delta, or lower q or steps"
            )
        epsilon_high = epsilon_at(sigma_high)
    while epsilon_high < target_epsilon - tolerance:
        if sigma_high - sigma_low <= _MIN_RELATIVE_BRACKET * sigma_high:
            raise RuntimeError(
                f"epsilon jumps from above target_epsilon={target_epsilon!r} to {epsilon_high!r} at "
                f"sigma={sigma_high!r} (accountant not continuous here); use a larger tolerance than "
                f"{tolerance!r}"
            )
        sigma_mid = (sigma_low + sigma_high) / 2
        epsilon_mid = epsilon_at(sigma_mid)
        if epsilon_mid <= target_epsilon:
            sigma_high, epsilon_high = sigma_mid, epsilon_mid
        else:
            sigma_low = sigma_mid
    return sigma_high


def _cache_key(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    tolerance: float,
    label_count_noise_multiplier: float | None = None,
) -> str:
    """Exact, human-readable cache key (JSON writes floats with round-trip precision).

    The label-count sigma is a key only when there is a release, so the keys of plain DP-SGD runs (and the
    caches written before it existed) are unchanged.
    """
    fields: dict[str, object] = {
        "accountant": accountant,
        "delta": delta,
        "opacus": version("opacus"),
        "sample_rate": sample_rate,
        "steps": steps,
        "target_epsilon": target_epsilon,
        "tolerance": tolerance,
    }
    if label_count_noise_multiplier is not None:
        fields["label_count_noise_multiplier"] = label_count_noise_multiplier
    return json.dumps(fields, sort_keys=True)


def _read_cache_entries(cache_path: Path) -> dict[str, object]:
    """Entries of the cache file; {} when it is missing, or (with a warning) unreadable."""
    try:
        raw = cache_path.read_bytes()
    except FileNotFoundError:
        return {}
    try:
        content = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        problem = f"is not valid JSON ({error})"
    else:
        if (
            isinstance(content, dict)
            and content.get("format") == _CACHE_FORMAT
            and content.get("version") == _CACHE_VERSION
            and isinstance(content.get("entries"), dict)
        ):
            entries: dict[str, object] = content["entries"]  # json.loads gives Any; checked a dict just above
            return entries
        problem = f"is not a {_CACHE_FORMAT} version {_CACHE_VERSION} file"
    warnings.warn(
        f"noise-multiplier cache {cache_path} {problem}; ignoring its contents and rebuilding it",
        CalibrationCacheWarning,
        stacklevel=4,
    )
    return {}


def _cached_noise_multiplier(cache_path: Path, key: str, target_epsilon: float, tolerance: float) -> float | None:
    """The cached sigma for ``key``, or None when absent or (with a warning) invalid."""
    entry = _read_cache_entries(cache_path).get(key)
    if entry is None:
        return None
    sigma = entry.get("noise_multiplier") if isinstance(entry, dict) else None
    epsilon = entry.get("epsilon") if isinstance(entry, dict) else None
    if (
        isinstance(sigma, float)
        and isinstance(epsilon, float)
        and 0 < sigma < math.inf
        and target_epsilon - tolerance <= epsilon <= target_epsilon
    ):
        return sigma
    warnings.warn(
        f"noise-multiplier cache {cache_path}: invalid entry {entry!r} for {key}; recomputing it",
        CalibrationCacheWarning,
        stacklevel=3,
    )
    return None


def _store_noise_multiplier(cache_path: Path, key: str, sigma: float, epsilon: float) -> None:
    """Add one entry to the cache file by atomic replacement (re-reads first to keep others' entries)."""
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    entries = _read_cache_entries(cache_path)
    entries[key] = {"noise_multiplier": sigma, "epsilon": epsilon}
    payload = json.dumps(
        {"format": _CACHE_FORMAT, "version": _CACHE_VERSION, "entries": entries}, indent=1, sort_keys=True
    )
    handle, temporary = tempfile.mkstemp(dir=cache_path.parent, prefix=f".{cache_path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, 0o644)  # mkstemp's 0600 would hide the cache from other users of a shared run
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, cache_path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def cross_check_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    *,
    label_count_noise_multiplier: float | None = None,
) -> dict[str, float]:
    """Epsilon of the same DP-SGD run from Google's ``dp-accounting``, independent of Opacus.

    The event is ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)``
    under ``NeighboringRelation.ADD_OR_REMOVE_ONE``, as in Opacus; with a label-count release it is
    ``ComposedDpEvent([GaussianDpEvent(sigma_c), that event])``. Expected relations to Opacus:

    * ``"rdp"`` (``RdpAccountant``, its default orders: 1.1-10.9, 11-63, 128, 256, 512, 1024): equal
      to Opacus's RDP at integer orders; at fractional orders dp-accounting 0.6 sums the absolute
      values of the binomial series, a valid but looser bound than Opacus's signed (exact) series.
      So it is slightly *above* Opacus's when the optimal order is fractional (measured up to +0.11%
      at epsilon ~10) and can be slightly below when an order Opacus lacks (11, >= 128) is optimal.
    * ``"pld"`` (``PLDAccountant``, value discretization 1e-4, pessimistic rounding): a near-tight
      upper bound over *both* add and remove directions; at or below RDP, and close to (slightly
      below) Opacus's PRV, which analyses one direction.

    Args:
        noise_multiplier: sigma, the noise standard deviation divided by the clip norm.
        sample_rate: q, the Poisson sampling probability per step, in (0, 1].
        steps: number of DP-SGD steps, >= 0.
        delta: the delta of the guarantee, in (0, 1).
        label_count_noise_multiplier: sigma_c of the label-count release made before training, or None.

    Returns:
        ``{"rdp": epsilon, "pld": epsilon}``; zeros when nothing was released, infinities for sigma = 0
        with at least one step.
        PLD takes 0.1-3 s per call at the study's scales.

    Raises:
        ValueError: an argument is outside its domain.
    """
    _check_noise_multiplier(noise_multiplier)
    _check_run(sample_rate, steps, delta)
    _check_label_count_noise_multiplier(label_count_noise_multiplier)
    if steps == 0 and label_count_noise_multiplier is None:
        return {"rdp": 0.0, "pld": 0.0}
    if noise_multiplier == 0 and steps > 0:
        return {"rdp": math.inf, "pld": math.inf}
    # Imported here: only the final cross-check needs Google's package (keeps trial start-up light).
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.privacy_accountant import NeighboringRelation
    from dp_accounting.rdp import RdpAccountant

    event = _dp_accounting_event(noise_multiplier, sample_rate, steps, label_count_noise_multiplier)
    rdp = RdpAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
    pld = PLDAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
    rdp.compose(event)
    pld.compose(event)
    return {"rdp": float(rdp.get_epsilon(delta)), "pld": float(pld.get_epsilon(delta))}


def replace_one_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    *,
    label_count_noise_multiplier: float | None = None,
) -> float:
    """Epsilon of the same run under **replace-one** adjacency (N fixed), from dp-accounting's PLD.

    dpsweep accounts add/remove of one record and treats N as public (module docstring). Strictly, a released N
    fixes the dataset's size, and the neighbours of a fixed size differ by replacing one record: a replaced record
    can move the clipped sum by 2C, not C. This is the epsilon of that reading, reported beside the add/remove one
    (never used to calibrate): ``PLDAccountant(neighboring_relation=REPLACE_ONE)`` (value discretization 1e-4,
    pessimistic rounding, both orderings) on ``SelfComposedDpEvent(PoissonSampledDpEvent(q,
    GaussianDpEvent(sigma)), steps)``. The smoke sweep's target 1 (sigma 1.37109375, q 1/56, 168 steps, delta
    6e-6; RDP add/remove 0.995, PLD add/remove 0.846) reads 1.378; targets 3 and 8 read 2.968 and 7.351.

    The label-count release (`trainables.privacy.label_counts`) is composed first as ``GaussianDpEvent(2 sigma_c)``:
    dp-accounting doubles a Gaussian's sensitivity under REPLACE_ONE, but replacing one image changes each label's
    count by at most 1 either way, so the counts' L2 sensitivity stays sqrt(5), exactly the add/remove one, and
    the release's replace-one loss is that of noise multiplier sigma_c (doubling it cancels dp-accounting's
    doubling).

    Args:
        noise_multiplier, sample_rate, steps, delta, label_count_noise_multiplier: as `cross_check_epsilon`.

    Returns:
        Epsilon (dimensionless); 0.0 when nothing was released, ``inf`` for sigma = 0 with at least one step.
        0.1-3 s per call at the study's scales.

    Raises:
        ValueError: an argument is outside its domain.
    """
    _check_noise_multiplier(noise_multiplier)
    _check_run(sample_rate, steps, delta)
    _check_label_count_noise_multiplier(label_count_noise_multiplier)
    if steps == 0 and label_count_noise_multiplier is None:
        return 0.0
    if noise_multiplier == 0 and steps > 0:
        return math.inf
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.privacy_accountant import NeighboringRelation

    count_sigma = None if label_count_noise_multiplier is None else 2 * float(label_count_noise_multiplier)
    pld = PLDAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    pld.compose(_dp_accounting_event(noise_multiplier, sample_rate, steps, count_sigma))
    return float(pld.get_epsilon(delta))


def _dp_accounting_event(
    noise_multiplier: float, sample_rate: float, steps: int, label_count_noise_multiplier: float | None
) -> dp_event.DpEvent:
    """dp-accounting's event of a trial: the label-count release ``GaussianDpEvent(sigma_c)`` (when there is one)
    followed by ``steps`` Poisson-sampled Gaussian steps (when there are any)."""
    from dp_accounting import dp_event

    events: list[dp_event.DpEvent] = []
    if label_count_noise_multiplier is not None:
        events.append(dp_event.GaussianDpEvent(float(label_count_noise_multiplier)))
    if steps:
        events.append(
            dp_event.SelfComposedDpEvent(
                dp_event.PoissonSampledDpEvent(float(sample_rate), dp_event.GaussianDpEvent(float(noise_multiplier))),
                int(steps),
            )
        )
    return events[0] if len(events) == 1 else dp_event.ComposedDpEvent(events)


def validate_privacy_parameters(
    target_epsilon: float, delta: float, n_train: int, sample_rate: float, steps: int
) -> None:
    """Check a trial's privacy knobs before anything runs; raise ValueError naming field, value and fix.

    Args:
        target_epsilon: > 0, or ``inf`` for a non-private baseline.
        delta: in (0, 1/n_train): a delta of 1/N or more allows releasing one example outright.
        n_train: number of training examples N (images, the privacy unit), >= 1.
        sample_rate: q, the Poisson sampling probability per step, in (0, 1].
        steps: planned number of DP-SGD steps, >= 1.

    Raises:
        ValueError: the first parameter that is out of range.
    """
    if not (isinstance(target_epsilon, numbers.Real) and target_epsilon > 0):
        raise ValueError(f"target_epsilon={target_epsilon!r} must be > 0; use .inf for a non-private baseline")
    if not (isinstance(n_train, numbers.Integral) and n_train >= 1):
        raise ValueError(f"n_train={n_train!r} must be a whole number >= 1 of training images")
    if not (isinstance(delta, numbers.Real) and delta > 0):
        raise ValueError(f"delta={delta!r} must be > 0; choose delta < 1/N={1 / n_train:.6g}, e.g. 6e-6")
    if not delta < 1 / n_train:
        raise ValueError(
            f"delta={delta!r} >= 1/N={1 / n_train:.6g} for N={n_train} training images; "
            f"choose delta < {1 / n_train:.6g}, e.g. {0.1 / n_train:.2g}"
        )
    if not (isinstance(sample_rate, numbers.Real) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate={sample_rate!r} must be in (0, 1]; it is expected_batch_size / N per step")
    if not (isinstance(steps, numbers.Integral) and steps >= 1):
        raise ValueError(f"steps={steps!r} must be a whole number >= 1; increase epochs")


def sample_rate_and_steps(n_train: int, expected_batch_size: int, epochs: int) -> tuple[float, int]:
    """Sampling rate to account with and total steps, exactly as Opacus 1.6's ``PrivacyEngine`` does.

    Verified against the opacus 1.6.0 source. ``make_private`` replaces a
    ``DataLoader(dataset, batch_size=B)`` (``drop_last`` False, so ``len = ceil(N / B)``) by
    ``DPDataLoader.from_data_loader``, which samples with probability ``1 / ceil(N / B)``; its
    ``UniformWithReplacementSampler`` yields ``int(1 / sample_rate)`` batches per epoch; and the
    accountant hook records ``1 / len(dp_data_loader)`` as the sampling rate of every step. Hence

        steps_per_epoch = int(1 / (1 / ceil(N / B)))   (float arithmetic, as Opacus)
        q = 1 / steps_per_epoch                        (what Opacus's accountant records)
        steps = epochs * steps_per_epoch

    Normally ``steps_per_epoch = ceil(N / B)`` and q is the true inclusion probability
    ``1 / ceil(N / B)`` (<= B / N; equal when B divides N). For some batch counts (93, 99, 105, 117,
    ...: ``1 / (1 / 93) = 92.99999999999999``) Opacus runs one step fewer per epoch and accounts with
    ``q = 1 / (ceil(N / B) - 1)``, slightly above the true rate: a valid, slightly conservative
    epsilon. We return that q so that calibration, `epsilon_spent` and ``PrivacyEngine.get_epsilon``
    agree exactly; a ``DPDataLoader(dataset, sample_rate=q)`` built directly from it runs the same
    ``steps_per_epoch`` and samples at exactly q. The distributed sampler is not covered.

    Args:
        n_train: number of training examples N, >= 1.
        expected_batch_size: B, the logical batch size of the loader, in [1, N].
        epochs: number of passes, >= 1.

    Returns:
        (q, total steps).

    Raises:
        ValueError: an argument is out of range.
    """
    if not (isinstance(n_train, numbers.Integral) and n_train >= 1):
        raise ValueError(f"n_train={n_train!r} must be a whole number >= 1 of training images")
    if not (isinstance(expected_batch_size, numbers.Integral) and 1 <= expected_batch_size <= n_train):
        raise ValueError(
            f"expected_batch_size={expected_batch_size!r} must be a whole number in [1, n_train={n_train}]"
        )
    if not (isinstance(epochs, numbers.Integral) and epochs >= 1):
        raise ValueError(f"epochs={epochs!r} must be a whole number >= 1")
    batches_per_pass = -(-int(n_train) // int(expected_batch_size))
    steps_per_epoch = int(1 / (1 / batches_per_pass))
    return 1 / steps_per_epoch, int(epochs) * steps_per_epoch
