"""What MLflow's UI shows first for a sweep: two saved views of the experiment page, stored as experiment tags.

MLflow 3.17's experiment page keeps its state (visible columns, grouping, charts) in the browser's localStorage,
which a sweep cannot reach. It also opens a *saved view* from an experiment tag ``mlflow.sharedViewState.<key>``
when the page's URL carries ``?viewStateShareKey=<key>`` (the UI's "Save & share view" writes the same tags; the
views are listed in the page's view menu). The tag holds an envelope ``{"name", "createdAt", "updatedAt", "state"}``
(times in ms since the epoch); ``state`` is the JSON of the page's UI state (``ExperimentPageUIState``, the fields
of `UI_STATE_DEFAULTS`) and search facets (`SEARCH_FACETS_DEFAULTS`), zlib-compressed behind ``deflate;``. What
MLflow 3.17 does with it (read in its sources and checked in headless Chromium, `tests/sweeps/test_mlflow_ui.py`):

- the view applies only when the URL holds no search facet of its own (``searchFilter``, ``orderByKey``, ...), so
  the URLs carry only the key (and ``compareRunsMode=CHART`` for the chart view);
- ``runsExpanded``, ``runsPinned``, ``runsHidden``, ``runsVisibilityMap`` and ``autoRefreshEnabled`` are never
  taken from a shared view (they stay the browser's own): a view cannot open a parent run over its children, so
  the views *group* the runs instead (groups are open by default);
- a group row shows each metric aggregated over its runs (the views: the average), so the groups are the cells a
  reader compares, init x budget (``groupByKeys`` over both params): never private and non-private runs together.
  The sweep's parent run has neither param and sits in its own group (``init: (none), budget: (none)``);
- a filter does not hide a matching child's parent (the UI fetches missing parents);
- the runs table pins the check box, run name and creation date columns to the left; column widths apply only to
  the columns named in ``columnOrder``;
- a chart colours each run with the colour in its ``mlflow.runColor`` tag (the tag the UI's own colour picker
  writes), else with one derived from its run id.

The two views (`publish_views`):

- ``dpsweep-runs``, the runs table grouped by init x budget, the headline columns (`headline_columns`: spent
  epsilon, test macro AUROC, the test AUROC gap per fairness attribute, each external set's macro AUROC, then init,
  budget, clip norm, learning rate) right after the pinned columns, narrow enough that the metrics of the sweep's
  own test set show without scrolling in a 1600-pixel-wide window; the duration column last. (MLflow keeps metric
  and param columns each under one header group: a column order that splits a group loses the columns after it.)
- ``dpsweep-charts``, the chart view of the trials (``tags.`dpsweep.role` = 'trial'``, each run its own point,
  coloured by its init: `INIT_COLORS`): a scatter per utility or fairness headline against the ``budget`` param
  (``eps=<target>`` or ``non-private``, a category, so the non-private baselines are points beside the private
  runs; a chart of ``privacy/epsilon`` would drop them), then parallel coordinates over init, budget and those
  metrics. Init is the colour and budget the x axis: init x epsilon at a glance. A data-scale sweep (trials with a
  ``train_fraction`` param) also gets test macro AUROC against the ``n_train`` param.

Both are written when the sweep's experiment is created or reused (`sweeps.tracking.get_or_create_experiment`) and
refreshed from the runs when the sweep ends and by ``dpsweep ui`` (which then know the external sets and colour
the trials that have no colour yet), so a user's own saved views must use other names.
"""

from __future__ import annotations

import base64
import json
import re
import time
import urllib.parse
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from trainables import names as M
from trainables.names import BUDGET_PARAM, HEADLINE_ATTRIBUTES, ROLE_TAG

SHARE_TAG_PREFIX = "mlflow.sharedViewState."
"""MLflow's experiment-tag prefix of a saved (shared) experiment-page view; the rest of the key is the share key."""
SHARE_URL_PARAM = "viewStateShareKey"
RUNS_VIEW = "dpsweep-runs"
CHARTS_VIEW = "dpsweep-charts"
VIEW_NAMES = {RUNS_VIEW: "dpsweep: runs and headline columns", CHARTS_VIEW: "dpsweep: budget vs utility charts"}
DEFLATE_PREFIX = "deflate;"
MAX_TAG_VALUE = 5000
"""Longest experiment tag value the SQL stores keep (characters); a longer view is refused, never truncated."""

HEADLINE_PARAMS: tuple[str, ...] = ("init", BUDGET_PARAM, "max_grad_norm", "lr")
TRIALS_FILTER = f"tags.`{ROLE_TAG}` = 'trial'"
CELL_GROUPS = {
    "aggregateFunction": "average",
    "groupByKeys": [{"mode": "param", "groupByData": "init"}, {"mode": "param", "groupByData": BUDGET_PARAM}],
}
"""One group per init x budget: a group row averages the runs of one cell (seeds, learning rates, clip norms),
never private with non-private runs."""
RUN_NAME_COLUMN = "attributes.`Run Name`"
CREATED_COLUMN, DURATION_COLUMN = "runDateAndNestInfo", "duration"  # ids as MLflow 3.17 names them
RUN_NAME_WIDTH, CREATED_WIDTH = 310, 130
"""Pixels of the pinned run name (fits ``init: domain, budget: non-private``) and creation date columns."""
CHARACTER_WIDTH, HEADER_PADDING, VALUE_WIDTH, PARAM_WIDTH = 6, 44, 150, 105
"""A metric column shows its whole header (about 6 pixels per character of the name in MLflow 3.17's header font,
plus the sort icon and padding) and a run's whole value (17 significant digits), as measured in headless Chromium."""
RUN_COLOR_TAG = "mlflow.runColor"
"""The run tag whose colour MLflow's charts draw a run in (the UI's colour picker writes it too)."""
INIT_COLORS: dict[str, str] = {"random": "#c83243", "domain": "#137dae", "imagenet": "#308613", "dinov3": "#8a63bf"}
"""Each named init's colour in the charts (coral, turquoise, lime, purple: MLflow's own run palette)."""
OTHER_INIT_COLORS: tuple[str, ...] = ("#a6630c", "#b45091", "#434a93", "#04867d", "#de7921")
"""Colours of inits named otherwise (a timm tag, a weight file), picked by a hash of the name: two of them may share
one."""
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
    """The runs table's visible columns, in order: `headline_metrics`, then `HEADLINE_PARAMS` (MLflow keeps the
    metric and the param columns each under one header group, so the metrics come first together)."""
    return [column("metrics", m) for m in headline_metrics(external)] + [column("params", p) for p in HEADLINE_PARAMS]


def metric_width(metric: str) -> int:
    """Pixels that show a metric column's whole header and a run's value in MLflow 3.17's runs table."""
    return max(VALUE_WIDTH, CHARACTER_WIDTH * len(metric) + HEADER_PADDING)


def init_color(init: str) -> str:
    """The colour a run of this init is drawn in: `INIT_COLORS`, else one of `OTHER_INIT_COLORS` by a hash of the
    name (stable across sweeps and machines)."""
    return INIT_COLORS.get(init) or OTHER_INIT_COLORS[zlib.crc32(init.encode()) % len(OTHER_INIT_COLORS)]


def runs_view_state(external: Sequence[str] = ()) -> dict[str, Any]:
    """The runs-table view: the runs grouped by init x budget (`CELL_GROUPS`; groups are open), the headline columns
    right after the pinned ones, each as wide as its header, the duration last."""
    columns = headline_columns(external)
    return {
        **SEARCH_FACETS_DEFAULTS,
        **UI_STATE_DEFAULTS,
        "selectedColumns": columns,
        "columnOrder": [RUN_NAME_COLUMN, CREATED_COLUMN, *columns, DURATION_COLUMN],
        "columnWidths": {
            RUN_NAME_COLUMN: RUN_NAME_WIDTH,
            CREATED_COLUMN: CREATED_WIDTH,
            **{column("params", p): PARAM_WIDTH for p in HEADLINE_PARAMS},
            **{column("metrics", m): metric_width(m) for m in headline_metrics(external)},
        },
        "groupBy": CELL_GROUPS,
    }


def charts_view_state(external: Sequence[str] = (), data_scale: bool = False) -> dict[str, Any]:
    """The chart view of the trials, each run its own point (not the group's average) in its init's colour (the
    ``mlflow.runColor`` tags `publish_views` sets): one scatter per headline utility or fairness metric against the
    budget category (2 a row), then parallel coordinates over init, budget and those metrics (full width). MLflow
    appends its own sections for the other metrics below. ``data_scale`` (a sweep with ``data.train_fraction``):
    one more scatter, test macro AUROC against the ``n_train`` param (the subset's training images)."""
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
    if data_scale:
        charts.append(
            {
                **common,
                "uuid": "dpsweep-n-train",
                "type": "SCATTER",
                "displayName": f"{M.TEST_AUROC_MACRO} by n_train",
                "xaxis": {"key": "n_train", "type": "PARAM"},
                "yaxis": {"key": M.TEST_AUROC_MACRO, "type": "METRIC"},
                "metricSectionId": sections[0]["uuid"],
            }
        )
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
        "groupBy": CELL_GROUPS,
        "useGroupedValuesInCharts": False,
        "compareRunCharts": charts,
        "compareRunSections": sections,
        "isAccordionReordered": True,  # keeps our sections first; MLflow appends sections for the other metrics
    }


def envelope(name: str, state: dict[str, Any], created_ms: int, updated_ms: int) -> str:
    """A saved view as MLflow 3.17 stores it in an experiment tag: JSON whose ``state`` is the view's JSON,
    zlib-compressed and base64-encoded behind ``deflate;`` (MLflow's ``textCompressDeflate``, pako's zlib format),
    so a view with the paper's five external sets fits a tag."""
    packed = zlib.compress(json.dumps(state, separators=(",", ":")).encode(), 9)
    text = json.dumps(
        {
            "name": name,
            "createdAt": created_ms,
            "updatedAt": updated_ms,
            "state": DEFLATE_PREFIX + base64.b64encode(packed).decode(),
        },
        separators=(",", ":"),
    )
    if len(text) > MAX_TAG_VALUE:
        raise ValueError(
            f"the MLflow view {name!r} takes {len(text)} characters, more than a tag holds ({MAX_TAG_VALUE})"
        )
    return text


def read_envelope(text: str) -> tuple[str, dict[str, Any], int]:
    """(name, state, createdAt) of a saved view in an experiment tag (compressed as `envelope` writes it, or plain)."""
    saved = json.loads(text)
    state = saved["state"]
    if state.startswith(DEFLATE_PREFIX):
        state = zlib.decompress(base64.b64decode(state[len(DEFLATE_PREFIX) :])).decode()
    return saved["name"], json.loads(state), int(saved["createdAt"])


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
    """Write (or refresh) the experiment's two dpsweep views from the runs it holds now, and colour its trials.

    The external datasets (columns and charts) are those some trial logged an ``external/<dataset>/auroc_macro``
    for. A view whose state did not change is left as it is (its ``updatedAt`` too); one that did keeps its
    ``createdAt``. A trial without a ``mlflow.runColor`` tag gets its init's colour (`init_color`); a colour a user
    picked in the UI stays.

    Args:
        client: an ``mlflow.tracking.MlflowClient`` of the store.
        experiment_id: the sweep's experiment.
        now_ms: the update time to record (default: now).
    """
    experiment = client.get_experiment(experiment_id)
    trials = client.search_runs([experiment_id], TRIALS_FILTER, max_results=1000)
    external = sorted({found.group(1) for run in trials for key in run.data.metrics if (found := _EXTERNAL.match(key))})
    for run in trials:
        init = run.data.params.get("init")
        if init is not None and RUN_COLOR_TAG not in run.data.tags:
            client.set_tag(run.info.run_id, RUN_COLOR_TAG, init_color(init))
    data_scale = any("train_fraction" in run.data.params for run in trials)
    states = {RUNS_VIEW: runs_view_state(external), CHARTS_VIEW: charts_view_state(external, data_scale)}
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    for key, state in states.items():
        tag = SHARE_TAG_PREFIX + key
        created_ms = now_ms
        if tag in experiment.tags:
            try:
                _, old_state, created_ms = read_envelope(experiment.tags[tag])
            except (ValueError, KeyError, TypeError, AttributeError, zlib.error):  # not ours: replaced
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
