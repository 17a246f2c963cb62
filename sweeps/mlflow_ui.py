"""What MLflow's UI shows first for a sweep: two saved views of the experiment page, stored as experiment tags.

MLflow 3.17's experiment page keeps its state (visible columns, expanded parent runs, charts) in the browser's
localStorage, which a sweep cannot reach. It also reads a *saved view* from an experiment tag
``mlflow.sharedViewState.<key>`` when the page's URL carries ``?viewStateShareKey=<key>`` (the UI's "Save & share
view" writes the same tags). The tag's value is an envelope ``{"name", "createdAt", "updatedAt", "state"}`` (times
in ms since the epoch) whose ``state`` is the JSON of the page's UI state (``ExperimentPageUIState``: the fields
in `UI_STATE_DEFAULTS`) plus its search facets (``searchFilter``, ``orderByKey``, ...). The view only applies when
the URL has no search facet of its own, so the URLs here carry the key and, for the chart view, the view mode.

dpsweep writes two views per sweep experiment (`publish_views`):

- ``dpsweep-runs`` (the runs table): each sweep's parent run expanded over its trials (child runs nest under their
  parent only while the table is sorted by start time without a filter), with the headline columns
  (`headline_columns`): init, privacy budget, clip norm, learning rate, spent epsilon, test macro AUROC, the test
  AUROC gap of each fairness attribute and each external dataset's macro AUROC.
- ``dpsweep-charts`` (the chart view): the trials only (``tags.`dpsweep.role` = 'trial'``), first a section of
  scatter plots with the ``budget`` param on the x axis (``eps=<target>`` or ``non-private``, a category, so the
  non-private baselines are points beside the private runs), then a parallel-coordinates plot.

Both are rewritten from the store's runs each time (`publish_views`, at sweep start and by ``dpsweep ui``), so a
user's own saved views must use other names.
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from trainables import names as M
from trainables.names import BUDGET_PARAM, HEADLINE_ATTRIBUTES, ROLE_TAG, SWEEP_TAG

SHARE_TAG_PREFIX = "mlflow.sharedViewState."
"""MLflow's experiment-tag prefix of a saved (shared) experiment-page view; the rest of the key is the share key."""
SHARE_URL_PARAM = "viewStateShareKey"
RUNS_VIEW = "dpsweep-runs"
CHARTS_VIEW = "dpsweep-charts"
VIEW_NAMES = {RUNS_VIEW: "dpsweep: runs and headline columns", CHARTS_VIEW: "dpsweep: budget vs utility charts"}
MAX_TAG_VALUE = 5000
"""Longest experiment tag value the SQL stores keep (characters); a longer view is refused, never truncated."""

HEADLINE_PARAMS: tuple[str, ...] = ("init", BUDGET_PARAM, "max_grad_norm", "lr")
TRIALS_FILTER = f"tags.`{ROLE_TAG}` = 'trial'"
SWEEP_GROUPS = {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": SWEEP_TAG}]}
RUN_NAME_COLUMN = "attributes.`Run Name`"
LEADING_COLUMNS: tuple[str, ...] = (RUN_NAME_COLUMN, "runDateAndNestInfo", "duration")
"""The runs table's first columns (ids as MLflow 3.17 names them: run name, created, duration)."""
RUN_NAME_WIDTH, METRIC_WIDTH = 280, 170  # pixels; MLflow applies widths only to the columns of `columnOrder`
CHART_RUNS = 1000
"""How many runs a chart draws (MLflow's default draws only the first 10 or 100)."""
_EXTERNAL = re.compile(r"^external/(.+)/auroc_macro$")

UI_STATE_DEFAULTS: dict[str, Any] = {
    "selectedColumns": [],
    "columnOrder": [],
    "columnWidths": {},
    "runsExpanded": {},
    "runsPinned": [],
    "runsHidden": [],
    "runsVisibilityMap": {},
    "runsHiddenMode": "SHOW_ALL",
    "compareRunCharts": None,
    "compareRunSections": None,
    "viewMaximized": False,
    "runListHidden": False,
    "isAccordionReordered": False,
    "groupBy": None,
    "groupsExpanded": {},
    "autoRefreshEnabled": False,
    "useGroupedValuesInCharts": True,
    "hideEmptyCharts": True,
    "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
    "chartsSearchFilter": "",
}
"""Every field of MLflow 3.17's ``ExperimentPageUIState`` (its defaults, except: all runs visible, no auto-refresh)."""
SEARCH_FACETS_DEFAULTS: dict[str, Any] = {
    "searchFilter": "",
    "orderByKey": "attributes.start_time",
    "orderByAsc": False,
    "startTime": "ALL",
    "lifecycleFilter": "Active",
    "datasetsFilter": [],
    "modelVersionFilter": "All Runs",
}


def column(kind: Literal["attributes", "params", "metrics", "tags"], key: str) -> str:
    """A runs-table column id as MLflow names it, e.g. ``metrics.`test/auroc_macro```."""
    return f"{kind}.`{key}`"


def headline_metrics(external: Sequence[str] = ()) -> list[str]:
    """Spent epsilon, test macro AUROC, test AUROC gap per fairness attribute, macro AUROC per external dataset."""
    gaps = [M.auroc_gap("test", attribute) for attribute in HEADLINE_ATTRIBUTES]
    return [M.EPSILON, M.TEST_AUROC_MACRO, *gaps, *(M.external_auroc(name) for name in external)]


def headline_columns(external: Sequence[str] = ()) -> list[str]:
    """The runs table's visible columns: `HEADLINE_PARAMS`, then `headline_metrics`."""
    return [column("params", p) for p in HEADLINE_PARAMS] + [column("metrics", m) for m in headline_metrics(external)]


def runs_view_state(external: Sequence[str] = ()) -> dict[str, Any]:
    """The runs-table view: the runs grouped by sweep (the group, open, holds the sweep's parent run and its trials),
    headline columns visible, the run name column wide enough for trial names."""
    return {
        **SEARCH_FACETS_DEFAULTS,
        **UI_STATE_DEFAULTS,
        "selectedColumns": headline_columns(external),
        "columnOrder": [*LEADING_COLUMNS, *headline_columns(external)],
        "columnWidths": {
            RUN_NAME_COLUMN: RUN_NAME_WIDTH,
            **{column("metrics", m): METRIC_WIDTH for m in headline_metrics(external)},
        },
        "groupBy": SWEEP_GROUPS,
    }


def charts_view_state(external: Sequence[str] = ()) -> dict[str, Any]:
    """The chart view of the trials, each run its own point (not the group's average): one scatter per headline
    utility or fairness metric against the budget category (2 a row), then parallel coordinates over init, budget and
    those metrics (full width). MLflow appends its own sections for the other metrics below."""
    budget_axis = {"key": BUDGET_PARAM, "type": "PARAM"}
    utility = [m for m in headline_metrics(external) if m != M.EPSILON]  # non-private runs log no epsilon
    sections = [
        {"uuid": "dpsweep-budget", "name": "dpsweep: by budget", "display": True, "isReordered": True, "columns": 2},
        {
            "uuid": "dpsweep-all",
            "name": "dpsweep: all headline metrics",
            "display": True,
            "isReordered": True,
            "columns": 1,
        },
    ]
    common = {"runsCountToCompare": CHART_RUNS, "deleted": False, "isGenerated": False}
    charts: list[dict[str, Any]] = [
        {
            **common,
            "uuid": f"dpsweep-budget-{index}",
            "type": "SCATTER",
            "displayName": f"{metric} by budget",
            "xaxis": budget_axis,
            "yaxis": {"key": metric, "type": "METRIC"},
            "metricSectionId": sections[0]["uuid"],
        }
        for index, metric in enumerate(utility)
    ]
    charts.append(
        {
            **common,
            "uuid": "dpsweep-parallel",
            "type": "PARALLEL",
            "selectedParams": ["init", BUDGET_PARAM],
            "selectedMetrics": utility,
            "showAllRuns": True,
            "metricSectionId": sections[1]["uuid"],
        }
    )
    return {
        **SEARCH_FACETS_DEFAULTS,
        **UI_STATE_DEFAULTS,
        "searchFilter": TRIALS_FILTER,
        "selectedColumns": headline_columns(external),
        "groupBy": SWEEP_GROUPS,
        "useGroupedValuesInCharts": False,
        "compareRunCharts": charts,
        "compareRunSections": sections,
        "isAccordionReordered": True,  # keeps our sections first; MLflow appends sections for the other metrics
    }


def envelope(name: str, state: dict[str, Any], created_ms: int, updated_ms: int) -> str:
    """A saved view as MLflow 3.17 stores it in an experiment tag (the state is a JSON string inside JSON)."""
    text = json.dumps(
        {"name": name, "createdAt": created_ms, "updatedAt": updated_ms, "state": json.dumps(state)},
        separators=(",", ":"),
    )
    if len(text) > MAX_TAG_VALUE:
        raise ValueError(
            f"the MLflow view {name!r} takes {len(text)} characters, more than a tag holds ({MAX_TAG_VALUE})"
        )
    return text


def read_envelope(text: str) -> tuple[str, dict[str, Any], int]:
    """(name, state, createdAt) of a saved view written by `envelope` (or by MLflow's UI, uncompressed)."""
    saved = json.loads(text)
    return saved["name"], json.loads(saved["state"]), int(saved["createdAt"])


@dataclass(frozen=True)
class ExperimentViews:
    """A sweep experiment and the paths of its views (relative to the UI's root URL).

    Attributes:
        name: the experiment's name (the sweep's, unless the spec names another).
        experiment_id: MLflow's id of it.
        runs: ``#/experiments/<id>/runs?viewStateShareKey=dpsweep-runs``.
        charts: the same with ``dpsweep-charts`` and ``compareRunsMode=CHART``.
    """

    name: str
    experiment_id: str
    runs: str
    charts: str


def view_paths(name: str, experiment_id: str) -> ExperimentViews:
    """The UI routes (hash router) that open an experiment's runs page on dpsweep's two views."""
    page = f"#/experiments/{urllib.parse.quote(experiment_id)}/runs"
    return ExperimentViews(
        name,
        experiment_id,
        runs=f"{page}?{SHARE_URL_PARAM}={RUNS_VIEW}",
        charts=f"{page}?{SHARE_URL_PARAM}={CHARTS_VIEW}&compareRunsMode=CHART",
    )


def publish_views(client: Any, experiment_id: str, now_ms: int | None = None) -> ExperimentViews:
    """Write (or refresh) the experiment's two dpsweep views from the runs it holds now.

    The sweep parent runs (role ``sweep``) are expanded; the external datasets are those some trial logged an
    ``external/<dataset>/auroc_macro`` for. A view whose state did not change is left as it is.

    Args:
        client: an ``mlflow.tracking.MlflowClient`` of the store.
        experiment_id: the sweep's experiment.
        now_ms: the update time to record (default: now).
    """
    experiment = client.get_experiment(experiment_id)
    trials = client.search_runs([experiment_id], TRIALS_FILTER, max_results=1000)
    external = sorted({found.group(1) for run in trials for key in run.data.metrics if (found := _EXTERNAL.match(key))})
    states = {RUNS_VIEW: runs_view_state(external), CHARTS_VIEW: charts_view_state(external)}
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    for key, state in states.items():
        tag = SHARE_TAG_PREFIX + key
        created_ms = now_ms
        if tag in experiment.tags:
            try:
                _, old_state, created_ms = read_envelope(experiment.tags[tag])
            except (ValueError, KeyError, TypeError):  # not ours (or edited by hand): replaced
                old_state = None
            if old_state == state:
                continue
        client.set_experiment_tag(experiment_id, tag, envelope(VIEW_NAMES[key], state, created_ms, now_ms))
    return view_paths(experiment.name, experiment_id)


def publish_sweep_views(client: Any) -> list[ExperimentViews]:
    """`publish_views` for every active experiment of the store that holds a dpsweep sweep (a run of role
    ``sweep``), in the store's order."""
    found = []
    for experiment in client.search_experiments(max_results=1000):
        if client.search_runs([experiment.experiment_id], f"tags.`{ROLE_TAG}` = 'sweep'", max_results=1):
            found.append(publish_views(client, experiment.experiment_id))
    return found


def sweep_view_lines(tracking_uri: str, base_url: str) -> list[str]:
    """What ``dpsweep ui`` prints before serving: the URL of each sweep's runs view and chart view (publishing
    them first), or the root URL when the store holds no sweep yet."""
    from mlflow.tracking import MlflowClient

    views = publish_sweep_views(MlflowClient(tracking_uri))
    lines = [f"MLflow UI on {base_url} (Ctrl-C to stop)"]
    for view in views:
        lines += [f"  sweep {view.name!r}:", f"    runs   {base_url}{view.runs}", f"    charts {base_url}{view.charts}"]
    if not views:
        lines.append("  no sweep in this store yet: run `make sweep` first")
    return lines
