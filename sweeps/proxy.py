"""`search: proxy`: tune on public data with TAN scaling, then train each cell's best candidate on the private data.

TAN (Sander et al., ICML 2023, "TAN without a burn"): at the same number of steps S and the same noise-to-batch ratio
sigma / B, a DP-SGD run at a small expected batch predicts the utility of one at a large batch. Per grid point:

    reference (private, `sweeps.plan.plan_sweep`): B_ref = privacy.expected_batch_size, q_ref = 1/ceil(N_private/B_ref),
        S = epochs x ceil(N_private/B_ref), sigma_ref calibrated to the point's target epsilon
    proxy (public, `tan_privacy`): B_sim = proxy.batch_size, q_sim = B_sim / N_public, the same S steps (S / epochs per
        epoch), sigma_sim = sigma_ref x B_sim / B_ref, so the noise on the averaged gradient, sigma x C / B (the engine
        divides the noisy sum by the expected batch), is the reference's

Two phases, one `dpsweep sweep`:

    phase 1 (Ray part 0, `runs/ray/<sweep>/`): every grid point's proxy trial on ``proxy.dataset`` (its validation
        split ranks, its test split is evaluated too): key ``<grid key>-proxy``, param/tag ``phase = proxy``, budget
        ``proxy eps=<target>``, no epsilon metric, never in the privacy ledger (public data: nothing to account)
    phase 2 (Ray part 1, ``extension-1``): per cell (model x dataset x init x target) the proxy candidate with the best
        validation AUROC (`RANK_METRIC`; grid order on ties) is trained once on the private data at the cell's
        target, an ordinary grid trial (its grid key, ``phase = private``): the cell's epsilon is exactly its target,
        and the ledger records only these trials

``runs/<sweep>/proxy.json`` (`PROXY_FILE`) holds every candidate's proxy score, rank and the chosen ones. With
``proxy.top_k`` above 1, phase 2 is a private selection among each cell's top k (`ProxyRun.select`, reusing
`sweeps.selection`: secret K and draws, one calibrated shape, only each cell's winner released, the ledger recording
each cell's selection once); phase 1 then simulates the selection's single-run sigma.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sweeps import selection as selection_module
from sweeps.plan import (
    DatasetPlan,
    Log,
    SweepPaths,
    SweepPlan,
    _manifest,
    cell_privacy,
    make_trial,
    provenance_tags,
    trial_name,
)
from sweeps.schema import GridCell, GridPoint, SelectionSpec, SpecError, SweepSpec
from sweeps.selection import (
    DRAWS_FILE,
    Candidate,
    CellSelection,
    SelectionRun,
    secret_generator,
    trial_count,
    write_private,
)
from trainables import names as N
from trainables.config import PrivacyConfig
from trainables.models import ResolvedInit
from trainables.point import TrialPoint
from trainables.privacy.selection import plan_selection

PHASE_PARAM = "phase"
"""The trial param (and trials.parquet column) of a proxy sweep's trials: `PROXY_PHASE` or `PRIVATE_PHASE`."""
PHASE_TAG = f"{N.TAG_PREFIX}phase"
PROXY_PHASE, PRIVATE_PHASE = "proxy", "private"
PROXY_PART, PRIVATE_PART = 0, 1
"""The Ray parts of the two phases (`analysis.tables.ray_part_dir`)."""
RANK_METRIC = N.VAL_SELECTED_AUROC_MACRO
"""What ranks the proxy candidates: the selected epoch's validation macro AUROC on the public dataset."""
PROXY_FILE = "proxy.json"
PROXY_SUFFIX = ("-proxy", " proxy")


def tan_privacy(reference: PrivacyConfig, batch_size: int, n_public: int) -> PrivacyConfig:
    """The proxy run of a planned private ``reference`` on ``n_public`` public images at expected batch
    ``batch_size`` (B_sim): q_sim = B_sim / N_public, sigma_sim = sigma_ref x B_sim / B_ref, the same steps and epochs.

    Raises:
        ValueError: B_sim above N_public (q_sim > 1), or a reference that is not a planned private run.
    """
    if not reference.is_private or reference.steps < 1:
        raise ValueError(f"the reference must be a planned private run, got {reference}")
    if not 1 <= batch_size <= n_public:
        raise ValueError(f"B_sim = {batch_size} must be in [1, N_public = {n_public}]")
    return dataclasses.replace(
        reference,
        expected_batch_size=batch_size,
        sample_rate=batch_size / n_public,
        noise_multiplier=reference.noise_multiplier * batch_size / reference.expected_batch_size,
    )


@dataclass(frozen=True)
class ProxyCandidate:
    """One grid point of phase 1.

    Attributes:
        point: the grid point (its cell is the private one).
        reference: its planned private run (sigma_ref, q_ref, S).
        trial: its proxy trial on the public dataset.
    """

    point: GridPoint
    reference: PrivacyConfig
    trial: TrialPoint

    @property
    def key(self) -> str:
        return self.trial.key


@dataclass(frozen=True)
class ProxyPlan:
    """Phase 1 of a proxy sweep: the public dataset and one candidate per grid point, in grid order."""

    dataset: DatasetPlan
    batch_size: int
    top_k: int
    candidates: tuple[ProxyCandidate, ...]
    selections: dict[str, CellSelection] = dataclasses.field(default_factory=dict)
    """``top_k`` above 1: each cell's private selection among its top k (`plan_cell_selections`), whose candidate
    plan is also each of its grid points' reference."""

    @property
    def trials(self) -> list[TrialPoint]:
        return [candidate.trial for candidate in self.candidates]


def plan_proxy(
    spec: SweepSpec,
    paths: SweepPaths,
    datasets: dict[str, DatasetPlan],
    privacy_plans: dict[tuple[str, float, str], PrivacyConfig],
    inits: dict[tuple[str, str], ResolvedInit],
    dry_run: bool,
    notes: list[str],
) -> ProxyPlan:
    """Phase 1: the public dataset's size (prepared, or for a dry run drawn or estimated) and each grid point's proxy
    trial (`proxy_trial`).

    Raises:
        SpecError: the public dataset cannot be read, or ``proxy.batch_size`` exceeds its training images.
    """
    from sweeps.estimate import ESTIMATED_TRAIN_IMAGES

    proxy = spec.proxy
    assert proxy is not None
    try:
        manifest = _manifest(spec, paths, proxy.dataset, dry_run)
        n_public, estimated = int((manifest["split"] == "train").sum()), False
    except (FileNotFoundError, ValueError) as error:
        if not (dry_run and proxy.dataset in ESTIMATED_TRAIN_IMAGES):
            raise SpecError(f"{spec.source}: proxy.dataset: {error}") from None
        notes.append(str(error))
        n_public, estimated = ESTIMATED_TRAIN_IMAGES[proxy.dataset], True
    if proxy.batch_size > n_public:
        raise SpecError(
            f"{spec.source}: proxy.batch_size = {proxy.batch_size} is larger than {proxy.dataset}'s {n_public} "
            f"training images; choose at most {n_public}"
        )
    public = DatasetPlan(proxy.dataset, n_public, proxy.batch_size / n_public, 0, estimated)
    selections = plan_cell_selections(spec, datasets) if proxy.top_k > 1 else {}
    shape = (spec.privacy.expected_batch_size, spec.privacy.epochs)
    tags = provenance_tags()
    candidates = []
    for point in spec.grid():
        if selections:  # phase 2 runs the selection's candidate plan: simulate that one
            reference = selections[point.cell.key].plan.candidates[shape]
        else:
            reference = privacy_plans[(point.dataset, point.target_epsilon, point.privacy_unit)]
        trial = proxy_trial(spec, paths, public, inits[(point.model, point.init)], point, reference, tags)
        candidates.append(ProxyCandidate(point, reference, trial))
    return ProxyPlan(public, proxy.batch_size, proxy.top_k, tuple(candidates), selections)


def plan_cell_selections(spec: SweepSpec, datasets: dict[str, DatasetPlan]) -> dict[str, CellSelection]:
    """``proxy.top_k`` above 1: each cell's private selection (Papernot & Steinke; `sweeps.selection`), K from the
    ``selection:`` section's distribution (its defaults without one), one candidate shape (the sweep's
    ``privacy.expected_batch_size`` and ``epochs``), calibrated so the cell's tuning-inclusive epsilon is its target.

    Raises:
        SpecError: a target the selection cannot meet.
    """
    count = trial_count(spec.selection or SelectionSpec())
    shape = [(spec.privacy.expected_batch_size, spec.privacy.epochs)]
    unit = spec.axes.privacy_unit[0]
    plans = {}
    for cell in spec.cells():
        n_records = datasets[cell.dataset].n_records(unit)
        try:
            plan = plan_selection(cell_privacy(spec, cell.target_epsilon, unit), n_records, shape, count)
        except ValueError as error:
            raise SpecError(
                f"{spec.source}: privacy.target_epsilon = {cell.target_epsilon:g} with proxy.top_k = "
                f"{spec.proxy.top_k if spec.proxy else 1} ({cell.dataset}): {error}"
            ) from None
        plans[cell.key] = CellSelection(cell, unit, n_records, plan)
    return plans


def draw_from_top_k(proxy: ProxyPlan, ranked: list[Ranked], rng: np.random.Generator) -> list[Candidate]:
    """Each cell's secret K (`sweeps.selection.draw_trial_count`) and its candidates, each one of the cell's top k
    proxy candidates drawn uniformly (with replacement), from secret randomness. The top k depend on public data only,
    so the candidates are independent of the private data, as the selection bound requires."""
    shape = next(iter(next(iter(proxy.selections.values())).plan.candidates))
    candidates = []
    for cell in ranked:
        top = cell.ranking[: proxy.top_k]
        selection = proxy.selections[cell.cell.key]
        ids: set[str] = set()
        for _ in range(selection_module.draw_trial_count(selection.plan.count, rng)):
            if not top:  # no proxy candidate finished: the cell's selection releases nothing
                break
            chosen, _ = top[int(rng.integers(len(top)))]
            candidate_id = secrets.token_hex(3)
            while candidate_id in ids:
                candidate_id = secrets.token_hex(3)
            ids.add(candidate_id)
            candidates.append(
                Candidate(
                    cell=cell.cell.key,
                    id=candidate_id,
                    lr=chosen.point.lr,
                    max_grad_norm=chosen.point.max_grad_norm,
                    expected_batch_size=shape[0],
                    epochs=shape[1],
                )
            )
    return candidates


def proxy_trial(
    spec: SweepSpec,
    paths: SweepPaths,
    public: DatasetPlan,
    init: ResolvedInit,
    point: GridPoint,
    reference: PrivacyConfig,
    tags: dict[str, str],
) -> TrialPoint:
    """The proxy trial of ``point``: its hyperparameters on the public dataset at `tan_privacy` of its reference,
    ``TrialConfig.proxy`` set, no external test sets, labelled ``phase = proxy`` (param and tag) with its reference's
    sigma, q and batch as params; key ``<grid key>-proxy``."""
    assert spec.proxy is not None
    privacy = tan_privacy(reference, spec.proxy.batch_size, public.n_train)
    cell = point.cell
    public_point = dataclasses.replace(
        point, cell=GridCell(cell.model, public.name, cell.init, cell.target_epsilon, cell.prefix)
    )
    made = make_trial(
        spec,
        paths,
        dataclasses.replace(public, steps=privacy.steps),
        init,
        public_point,
        trial_name(spec, point).then(*PROXY_SUFFIX),
        privacy=privacy,
        provenance_tags=tags,
    )
    config = dataclasses.replace(made.config, proxy=True, external_datasets=())
    flat = {k: str(v) if isinstance(v, list) else v for k, v in config.to_flat().items()}
    params = {
        **made.params,
        **flat,
        N.GUARANTEE: f"none: a proxy run on the public dataset {public.name} (not accounted); it ranks candidates only",
        PHASE_PARAM: PROXY_PHASE,
        "proxy_dataset": public.name,
        "proxy_of": trial_name(spec, point).key,
        "reference_noise_multiplier": reference.noise_multiplier,
        "reference_sample_rate": reference.sample_rate,
        "reference_expected_batch_size": reference.expected_batch_size,
    }
    run_tags = {
        **made.tags,
        PHASE_TAG: PROXY_PHASE,
        f"{N.TAG_PREFIX}dp_guarantee": "false",
        f"{N.TAG_PREFIX}adjacency": "none: public data (proxy run)",
    }
    return dataclasses.replace(made, config=config, params=params, tags=run_tags)


def private_trial(plan: SweepPlan, candidate: ProxyCandidate, score: float) -> TrialPoint:
    """Phase 2's trial of a chosen candidate: the ordinary grid trial of its point on the private data at the cell's
    planned privacy (its grid key), labelled ``phase = private`` with the candidate it came from."""
    spec, point = plan.spec, candidate.point
    made = make_trial(
        spec,
        plan.paths,
        plan.datasets[point.dataset],
        plan.inits[(point.model, point.init)],
        point,
        trial_name(spec, point),
        privacy=plan.privacy_plans[(point.dataset, point.target_epsilon, point.privacy_unit)],
        provenance_tags=provenance_tags(),
        extra_params={PHASE_PARAM: PRIVATE_PHASE, "proxy_candidate": candidate.key, "proxy_score": score},
    )
    return dataclasses.replace(made, tags={**made.tags, PHASE_TAG: PRIVATE_PHASE})


@dataclass(frozen=True)
class Ranked:
    """A cell's phase-1 ranking: (candidate, proxy validation AUROC) of its finished candidates, best first."""

    cell: GridCell
    ranking: tuple[tuple[ProxyCandidate, float], ...]

    @property
    def chosen(self) -> tuple[ProxyCandidate, float] | None:
        return self.ranking[0] if self.ranking else None


def rank_candidates(plan: ProxyPlan, scores: dict[str, float]) -> list[Ranked]:
    """Per cell, its candidates with a finite score (``scores``: proxy key -> `RANK_METRIC`), best first; ties keep
    the grid's order. Pure: no Ray, no files."""
    by_cell: dict[GridCell, list[tuple[ProxyCandidate, float]]] = {}
    for candidate in plan.candidates:
        by_cell.setdefault(candidate.point.cell, [])
        score = scores.get(candidate.key, math.nan)
        if math.isfinite(score):
            by_cell[candidate.point.cell].append((candidate, score))
    return [Ranked(cell, tuple(sorted(found, key=lambda pair: -pair[1]))) for cell, found in by_cell.items()]


def proxy_scores(experiment: Path, keys: set[str]) -> dict[str, float]:
    """Proxy key -> its final `RANK_METRIC`, for the finished proxy trials among ``keys``."""
    from sweeps.results import experiment_records

    return {
        record.key: float(record.final.get(RANK_METRIC, math.nan))
        for record in experiment_records(experiment)
        if record.key in keys and record.status == N.TERMINATED
    }


def public_summary(plan: ProxyPlan, ranked: list[Ranked], scores: dict[str, float]) -> dict[str, Any]:
    """``proxy.json``: the public dataset, B_sim, and per candidate its proxy score, rank in its cell and whether it was
    chosen for phase 2."""
    ranks = {c.key: (i + 1, i < plan.top_k) for r in ranked for i, (c, _) in enumerate(r.ranking)}
    return {
        "dataset": plan.dataset.name,
        "n_public": plan.dataset.n_train,
        "batch_size": plan.batch_size,
        "top_k": plan.top_k,
        "candidates": [
            {
                "candidate": c.key,
                "cell": c.point.cell.key,
                "proxy_of": c.key.removesuffix(PROXY_SUFFIX[0]),
                "target_epsilon": c.point.target_epsilon,
                "lr": c.point.lr,
                "max_grad_norm": c.point.max_grad_norm,
                "proxy_val_auroc": scores.get(c.key),
                "rank": ranks.get(c.key, (None, False))[0],
                "chosen": ranks.get(c.key, (None, False))[1],
                "noise_multiplier": c.trial.config.privacy.noise_multiplier,
                "sample_rate": c.trial.config.privacy.sample_rate,
                "steps": c.trial.config.privacy.steps,
                "reference_noise_multiplier": c.reference.noise_multiplier,
                "reference_sample_rate": c.reference.sample_rate,
            }
            for c in plan.candidates
        ],
    }


PartTuner = Callable[[SweepPlan, int, list[TrialPoint]], Any]
"""(the plan with a phase's trials, its Ray part, those trials) -> its Ray Tuner (`sweeps.launch`)."""


@dataclass(frozen=True)
class ProxyRun:
    """A proxy sweep's two phases (`run`)."""

    plan: SweepPlan

    @property
    def proxy(self) -> ProxyPlan:
        proxy: ProxyPlan | None = self.plan.proxy
        assert proxy is not None
        return proxy

    def run(self, tuner: PartTuner, trainable: Any, ledger: Any, tracking: tuple[str, str], log: Log) -> bool:
        """Phase 1 (its finished trials kept on resume), then per cell the best candidate's private trial, recorded in
        the ledger before it runs, or with ``top_k`` above 1 a private selection among the top k (`select`).
        ``tracking``: the MLflow experiment id and parent run. Returns False when interrupted before phase 2 ended."""
        phase1 = self.proxy.trials
        grid = tuner(dataclasses.replace(self.plan, trials=phase1), PROXY_PART, phase1).fit()
        if len(grid) > grid.num_terminated + grid.num_errors:  # interrupted: phase 2 waits for the next run
            return False
        experiment = self.plan.paths.ray_experiment(self.plan.spec)
        scores = proxy_scores(experiment, {t.key for t in phase1})
        ranked = rank_candidates(self.proxy, scores)
        summary_path = self.plan.paths.sweep_dir(self.plan.spec) / PROXY_FILE
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps(public_summary(self.proxy, ranked, scores), indent=2))
        if self.proxy.top_k > 1:
            return self.select(ranked, trainable, ledger, tracking)
        trials = []
        for cell in ranked:
            if cell.chosen is None:
                log(f"proxy: cell {cell.cell.key}: no proxy candidate finished; nothing trained on the private data")
                continue
            candidate, score = cell.chosen
            log(f"proxy: cell {cell.cell.key}: top-1 of phase 1 is {candidate.key} (proxy val AUROC {score:.4f})")
            trials.append(private_trial(self.plan, candidate, score))
        ledger.record(trials)  # only phase 2 trains on private data
        if not trials:
            return True
        private = tuner(dataclasses.replace(self.plan, trials=trials), PRIVATE_PART, trials).fit()
        return bool(len(private) == private.num_terminated + private.num_errors)

    def select(self, ranked: list[Ranked], trainable: Any, ledger: Any, tracking: tuple[str, str]) -> bool:
        """Phase 2 with ``top_k`` above 1: each cell's private selection (`sweeps.selection.SelectionRun`, Ray part
        `PRIVATE_PART`): K and the candidates drawn secretly from the top k (`draw_from_top_k`; read back from the
        private draws file on resume), each cell recorded once in the ledger, only each cell's winner published."""
        plan = dataclasses.replace(self.plan, selections=self.proxy.selections)
        experiment = plan.paths.ray_experiment(plan.spec)
        path = experiment / DRAWS_FILE
        if path.is_file():
            candidates = [Candidate(**row) for row in json.loads(path.read_text())["candidates"]]
        else:
            candidates = draw_from_top_k(self.proxy, ranked, secret_generator())
            write_private(path, {"candidates": [dataclasses.asdict(c) for c in candidates]})
        tags = provenance_tags()
        points = []
        for candidate in candidates:
            point = selection_module._point(plan, candidate, tags)
            params, point_tags = {**point.params, PHASE_PARAM: PRIVATE_PHASE}, {**point.tags, PHASE_TAG: PRIVATE_PHASE}
            points.append(dataclasses.replace(point, params=params, tags=point_tags))
        selection = SelectionRun(plan, tuple(candidates), tuple(points))
        selection.record(ledger)
        if points:
            from analysis.tables import ray_part_dir

            selection.tuner(trainable, ray_part_dir(experiment, PRIVATE_PART)).fit()
        return bool(selection.finish(*tracking, ledger).ended)


def released_trials(plan: SweepPlan) -> set[str] | None:
    """The trials a proxy sweep's tables hold: with ``top_k`` above 1, phase 1 and each cell's winner (the other
    candidates stay in the Ray folder, private storage); None (every trial) otherwise."""
    if plan.proxy is None or plan.proxy.top_k == 1:
        return None
    winners = selection_module.read_winners(plan.paths.sweep_dir(plan.spec)) or set()
    return {trial.key for trial in plan.proxy.trials} | winners


def summary_metrics(plan: SweepPlan, trials: pd.DataFrame) -> dict[str, float]:
    """The parent run's privacy metrics of a proxy sweep: phase 2's tuning cost (phase 1 trained on public data), or
    with ``top_k`` above 1 each cell's selection epsilons and their composition (as `search: private_selection`)."""
    from sweeps.tuning_cost import tuning_summary

    proxy = plan.proxy
    if proxy is None or proxy.top_k == 1:
        return tuning_summary(plan.spec, private_phase(trials))
    metrics: dict[str, float] = {}
    for key, cell in proxy.selections.items():
        metrics[f"{N.SELECTION_EPSILON}/{key}"] = cell.plan.epsilon
        metrics[f"{N.SELECTION_SINGLE_RUN_EPSILON}/{key}"] = cell.plan.single_run_epsilon
    return metrics | selection_module.selection_tuning_epsilons(plan.spec, list(proxy.selections.values()))


def private_phase(trials: pd.DataFrame) -> pd.DataFrame:
    """The rows of a trial table that trained on private data (a proxy sweep's phase 2; every row of other sweeps)."""
    if PHASE_PARAM not in trials:
        return trials
    return trials[trials[PHASE_PARAM].astype(str) != PROXY_PHASE]


def describe_proxy(plan: SweepPlan) -> list[str]:
    """The dry run's proxy lines: phase 1's trials with sigma_sim, q_sim and S (and their reference's sigma and q),
    phase 2 per cell."""
    proxy = plan.proxy
    assert proxy is not None
    approx = "~" if proxy.dataset.estimated else "="
    lines = [
        f"  phase 1 (proxy, public data, not accounted): {len(proxy.candidates)} trials on {proxy.dataset.name} "
        f"(N_train{approx}{proxy.dataset.n_train}), B_sim={proxy.batch_size}, sigma_sim = sigma_ref x B_sim / "
        f"B_ref (B_ref={plan.spec.privacy.expected_batch_size}), the reference's steps"
    ]
    for c in proxy.candidates:
        p, r = c.trial.config.privacy, c.reference
        lines.append(
            f"    {c.key}: sigma_sim {p.noise_multiplier:.4f}, q_sim {p.sample_rate:.5g}, S {p.steps} "
            f"(reference sigma {r.noise_multiplier:.4f}, q {r.sample_rate:.5g})"
        )
    if proxy.selections:
        lines.append(
            f"  phase 2 (private): per cell a private selection among the top-{proxy.top_k} of phase 1 by proxy "
            "validation AUROC (a secret number of candidates K, each one of the top k drawn at random; only the best "
            "by validation released; the ledger records each cell's selection only):"
        )
        lines.extend(f"    {cell.describe()}" for cell in proxy.selections.values())
        return lines
    lines.append(
        f"  phase 2 (private): per cell the top-{proxy.top_k} of phase 1 by proxy validation AUROC, trained on the "
        "private data at the cell's target epsilon (the ledger records these only):"
    )
    lines.extend(f"    {cell.key}: top-{proxy.top_k} of phase 1" for cell in plan.spec.cells())
    return lines
