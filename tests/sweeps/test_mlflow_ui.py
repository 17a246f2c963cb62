"""The MLflow UI as a user opens it after a sweep: read from the page rendered by headless Chromium, not from MLflow.

A finished tiny sweep (one private trial at epsilon 2 and its non-private baseline, with an external set) is served
by `dpsweep ui` exactly as `make ui` runs it, on a free loopback port; the test opens the two URLs that command
prints and checks what the page shows: the runs table (in a 1600-pixel-wide window the headline metric columns
are in view without scrolling; each trial in the group of its init x budget, never averaged with another budget;
headline columns with the values MLflow holds) and the chart view (the non-private baseline plotted beside the
private run against the ``budget`` param, every point in its init's colour). Screenshots go to
``$DPSWEEP_UI_SCREENSHOTS`` when set (else the test's temporary folder): ``mlflow-runs.png`` at 1600 pixels,
``mlflow-runs-wide.png`` with every column, ``mlflow-charts.png``, ``mlflow-charts-parallel.png``.
Chromium and the server run in process sessions of their own, killed afterwards even on failure. Skipped where no
Chromium is installed (Debian package ``chromium``).

The fast tests at the end check the saved views themselves (`sweeps.mlflow_ui`) on a scratch sqlite store.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sweeps import mlflow_ui as ui
from sweeps.plan import trial_name
from tests.browser import HeadlessChromium, require_chromium
from tests.ports import LOOPBACK, free_port
from tests.sweeps.local_sweep import local_sweep
from tests.sweeps.tiny import tiny_yaml
from trainables import names as M
from trainables.names import BUDGET_PARAM, PRIVATE_TAG, ROLE_TAG, TRIAL_KEY_TAG

REPO = Path(__file__).resolve().parents[2]
SERVER_START_S = 90  # `dpsweep ui` publishes the views (a few s of imports), then MLflow takes 4-8 s
SERVER_STOP_GRACE_S = 10
PAGE_TIMEOUT_S = 60  # a cold page on 2 shared cores: bundle download, parse, runs fetch, render
TABLE_SIZE = (2560, 1200)  # wide enough that ag-grid renders every headline column (it virtualises the rest)
CHART_SIZE = (1600, 1200)  # a laptop's browser window: the runs view's headline metrics must show at this width
EXTERNAL = "synthetic-b"
SPEC = tiny_yaml(name="ui", data={"external": [EXTERNAL]})

# Every rendered runs-table row as {column id: cell text}; ag-grid splits a row over pinned and scrolling
# containers, joined here by row index (in row order).
TABLE_JS = """(() => {
  const headers = Array.from(document.querySelectorAll('.ag-header-cell[col-id]')).map(e => e.getAttribute('col-id'));
  const rows = new Map();
  for (const row of document.querySelectorAll('.ag-row[row-index]')) {
    const index = Number(row.getAttribute('row-index'));
    const cells = rows.get(index) || {};
    for (const cell of row.querySelectorAll('.ag-cell[col-id]')) {
      cells[cell.getAttribute('col-id')] = cell.innerText.trim();
    }
    rows.set(index, cells);
  }
  return {headers, rows: Array.from(rows.entries()).sort((a, b) => a[0] - b[0]).map(e => e[1])};
})()"""
# Every rendered plotly chart: axis titles, x tick labels and the number of scatter points it draws.
CHARTS_JS = """Array.from(document.querySelectorAll('.js-plotly-plot')).map(plot => ({
  x: plot.querySelector('.xtitle') ? plot.querySelector('.xtitle').textContent : null,
  y: plot.querySelector('.ytitle') ? plot.querySelector('.ytitle').textContent : null,
  xticks: Array.from(plot.querySelectorAll('.xtick text')).map(t => t.textContent),
  points: plot.querySelectorAll('.scatterlayer .point').length,
}))"""
CARD = "[data-testid=experiment-view-compare-runs-card]"  # one chart card of the chart view
# Left and right edge (CSS pixels) of every runs-table header cell and of the table's visible area, once the given
# columns all lie within that area (else null).
IN_VIEW_JS = """((wanted) => {
  const area = document.querySelector('.ag-body-viewport').getBoundingClientRect();
  const columns = {};
  for (const header of document.querySelectorAll('.ag-header-cell[col-id]')) {
    const box = header.getBoundingClientRect();
    columns[header.getAttribute('col-id')] = [box.left, box.right];
  }
  const shown = wanted.every(id => columns[id] && area.left <= columns[id][0] && columns[id][1] <= area.right);
  return shown ? {area: [area.left, area.right], columns} : null;
})"""
# The fill colour of every point of the scatter whose y axis is the given metric.
POINT_COLOURS_JS = """((metric) => Array.from(document.querySelectorAll('.js-plotly-plot'))
  .filter(plot => plot.querySelector('.ytitle') && plot.querySelector('.ytitle').textContent === metric)
  .flatMap(plot => Array.from(plot.querySelectorAll('.scatterlayer .point')).map(p => p.style.fill)))"""
# MLflow 3.17 opens its Assistant side panel on a first visit; closed for the screenshots only (no check uses it).
CLOSE_ASSISTANT_JS = """(() => {
  const button = document.querySelector('[data-component-id="mlflow.assistant.chat_panel.close"]');
  if (button) button.click();
  return Boolean(button);
})()"""


@dataclass(frozen=True)
class Trial:
    """A finished child run as MLflow holds it (the reference the page is compared with)."""

    name: str
    budget: str
    private: bool
    metrics: dict[str, float]


@dataclass(frozen=True)
class Served:
    """The finished sweep's trials and the URLs `dpsweep ui` printed for it."""

    trials: list[Trial]
    runs_url: str
    charts_url: str
    printed: str


@pytest.fixture(scope="module")
def chromium() -> str:
    return require_chromium("check the MLflow UI in a headless browser")


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = os.environ.get("DPSWEEP_UI_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory) -> tuple[Path, list[Trial]]:
    """The tiny sweep, run to the end on a local Ray that is shut down before any browser starts."""
    with local_sweep(tmp_path_factory, SPEC, "ui.yaml") as (spec, paths, table):
        assert (table["status"] == M.TERMINATED).all(), table[["trial", "status", "error"]]
    client = MlflowClient(paths.tracking_uri)
    experiment = client.get_experiment_by_name(spec.name)
    runs = client.search_runs([experiment.experiment_id], f"tags.`{ROLE_TAG}` = 'trial'")
    # the sweep's end refreshed the views with the external set's column (before any `dpsweep ui`)
    _, view, _ = ui.read_envelope(experiment.tags[ui.SHARE_TAG_PREFIX + ui.RUNS_VIEW])
    assert ui.column("metrics", M.external_auroc(EXTERNAL)) in view["selectedColumns"]
    trials = [
        Trial(
            run.info.run_name,
            run.data.params.get(BUDGET_PARAM, ""),
            run.data.tags.get(PRIVATE_TAG) == "true",
            dict(run.data.metrics),
        )
        for run in runs
        if run.info.status == "FINISHED"
    ]
    assert len(trials) == len(table) == 2
    for run in runs:  # coloured by init when the sweep ended
        assert run.data.tags[ui.RUN_COLOR_TAG] == ui.init_color(run.data.params["init"])
    run_names = {name.key: name.run_name for name in (trial_name(spec, point) for point in spec.grid())}
    for run in runs:  # the names the runs list shows are the short ones
        assert run.info.run_name == run_names[run.data.tags[TRIAL_KEY_TAG]]
    return paths.runs_root, trials


def read_printed(log: Path, process: subprocess.Popen, deadline: float) -> str:
    """What `dpsweep ui` printed up to its chart-view URL (its output goes to ``log``)."""
    while True:
        text = log.read_text()
        if "charts " in text and text.endswith("\n"):
            return text
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"`dpsweep ui` printed no view URLs (exit status {process.poll()}):\n{text[-3000:]}")
        time.sleep(0.2)


def wait_for_health(url: str, log: Path, process: subprocess.Popen, deadline: float) -> None:
    while True:
        try:
            with urllib.request.urlopen(f"{url}health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:  # refused while starting
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(
                f"MLflow did not answer on {url}health (exit status {process.poll()}):\n{log.read_text()[-3000:]}"
            )
        time.sleep(0.5)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the process's session (MLflow forks a worker), SIGKILL to whatever is left after a grace period."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=SERVER_STOP_GRACE_S)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


@pytest.fixture(scope="module")
def served(chromium, finished_sweep, tmp_path_factory) -> Iterator[Served]:
    """`dpsweep ui --runs <runs> --port <free port>` (what `make ui PORT=...` runs), answering."""
    runs_root, trials = finished_sweep
    port = free_port()
    log = tmp_path_factory.mktemp("ui") / "dpsweep-ui.log"
    command = [sys.executable, "-m", "sweeps.cli", "ui", "--runs", str(runs_root), "--port", str(port)]
    with log.open("w") as out:
        process = subprocess.Popen(
            command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    try:
        deadline = time.monotonic() + SERVER_START_S
        printed = read_printed(log, process, deadline)
        base = f"http://{LOOPBACK}:{port}/"
        urls = dict(re.findall(rf"^\s+(runs|charts)\s+({re.escape(base)}\S+)$", printed, re.M))
        assert set(urls) == {"runs", "charts"}, printed
        wait_for_health(base, log, process, deadline)
        yield Served(trials, urls["runs"], urls["charts"], printed)
    finally:
        stop(process)


@pytest.fixture
def browser(chromium, tmp_path) -> Iterator[HeadlessChromium]:
    with HeadlessChromium(chromium, tmp_path / "profile", *CHART_SIZE) as page:
        yield page


def capture(browser: HeadlessChromium, path: Path) -> None:
    browser.evaluate(CLOSE_ASSISTANT_JS)
    browser.screenshot(path)


@pytest.mark.slow
def test_printed_urls_open_the_sweeps_views(served):
    assert "  sweep 'ui':" in served.printed
    assert re.search(r"/#/experiments/\d+/runs\?viewStateShareKey=dpsweep-runs$", served.runs_url)
    assert served.charts_url.endswith("?viewStateShareKey=dpsweep-charts&compareRunsMode=CHART")


@pytest.mark.slow
def test_non_private_runs_say_so_and_log_no_epsilon(finished_sweep):
    budgets = {trial.budget: trial for trial in finished_sweep[1]}
    assert set(budgets) == {"eps=2", M.NON_PRIVATE_BUDGET}
    assert budgets["eps=2"].private and not budgets[M.NON_PRIVATE_BUDGET].private
    assert M.EPSILON not in budgets[M.NON_PRIVATE_BUDGET].metrics  # no 1e308 stand-in for infinity
    assert 0 < budgets["eps=2"].metrics[M.EPSILON] <= 2


def wait_for_rows(browser: HeadlessChromium, names: list[str], columns: Sequence[str] = ()) -> dict:
    """The runs table once every named run has a row and every given column is rendered."""
    return browser.wait_for(
        f"(() => {{ const t = {TABLE_JS}; const names = {json.dumps(names)};"
        f" const columns = {json.dumps(list(columns))};"
        " const shown = t.rows.map(r => r['attributes.`Run Name`']);"
        " return names.every(n => shown.includes(n)) && columns.every(c => t.headers.includes(c)) ? t : null; })()",
        PAGE_TIMEOUT_S,
        f"rows of the child runs {names} with columns {columns}",
    )


@pytest.mark.slow
def test_runs_list_shows_the_headline_metrics_at_1600_pixels_and_groups_by_init_and_budget(
    served, browser, screenshots
):
    browser.open(served.runs_url)
    names = [trial.name for trial in served.trials]
    first = [ui.column("metrics", m) for m in (M.EPSILON, M.TEST_AUROC_MACRO)]
    try:
        wait_for_rows(browser, names)
        # as MLflow first opens, its Assistant panel takes the right of the window: epsilon and AUROC still show
        browser.wait_for(f"{IN_VIEW_JS}({json.dumps(first)})", PAGE_TIMEOUT_S, f"columns {first} in view")
        browser.evaluate(CLOSE_ASSISTANT_JS)
        # without it (closed once, it stays closed), every headline metric of the sweep's own test set
        headline = [ui.column("metrics", m) for m in ui.headline_metrics()]
        browser.wait_for(f"{IN_VIEW_JS}({json.dumps(headline)})", PAGE_TIMEOUT_S, f"columns {headline} in view")
    finally:
        capture(browser, screenshots / "mlflow-runs.png")

    browser.call(
        "Emulation.setDeviceMetricsOverride",
        {"width": TABLE_SIZE[0], "height": TABLE_SIZE[1], "deviceScaleFactor": 1, "mobile": False},
    )
    headline = ui.headline_columns([EXTERNAL])
    try:
        table = wait_for_rows(browser, names, headline)  # ag-grid renders the columns the wider window shows
    finally:
        capture(browser, screenshots / "mlflow-runs-wide.png")
    rows = table["rows"]
    run_names = [row.get("attributes.`Run Name`", "") for row in rows]
    groups = {
        i: found.groups()
        for i, name in enumerate(run_names)
        if (found := re.search(r"init: (\S+), budget: (\S+)", name))
    }
    by_name = {name: i for i, name in enumerate(run_names)}
    for trial in served.trials:
        index = by_name[trial.name]
        group = max(i for i in groups if i < index)  # the (open) group the trial is listed in
        assert groups[group] == ("random", trial.budget), (groups, run_names)
        # the group row averages only this cell's runs: here the trial alone
        assert float(rows[group][ui.column("metrics", M.TEST_AUROC_MACRO)].split()[0]) == pytest.approx(
            trial.metrics[M.TEST_AUROC_MACRO], rel=1e-9
        )
        row = rows[index]
        assert row[ui.column("params", "init")] == "random"
        assert row[ui.column("params", BUDGET_PARAM)] == trial.budget
        for metric in ui.headline_metrics([EXTERNAL]):
            cell = row[ui.column("metrics", metric)]
            if metric == M.EPSILON and not trial.private:
                assert cell == "-", cell  # nothing logged, nothing shown
            else:
                assert float(cell) == pytest.approx(trial.metrics[metric], rel=1e-9), (trial.name, metric, cell)


@pytest.mark.slow
def test_chart_view_plots_the_non_private_baseline_beside_the_private_run(served, browser, screenshots):
    browser.open(served.charts_url)
    finished = len(served.trials)
    try:
        charts = browser.wait_for(
            f"(() => {{ const c = {CHARTS_JS}; return c.some(p => p.x === 'budget' && p.y === "
            f"{json.dumps(M.TEST_AUROC_MACRO)} && p.points === {finished}) ? c : null; }})()",
            PAGE_TIMEOUT_S,
            f"a scatter of {M.TEST_AUROC_MACRO} against budget with {finished} points",
        )
    finally:
        capture(browser, screenshots / "mlflow-charts.png")
    by_budget = [chart for chart in charts if chart["x"] == BUDGET_PARAM]
    utility = [m for m in ui.headline_metrics([EXTERNAL]) if m != M.EPSILON]
    drawn = {chart["y"]: chart for chart in by_budget}
    assert drawn[M.TEST_AUROC_MACRO]["points"] == finished  # the private run and its non-private baseline
    assert sorted(drawn[M.TEST_AUROC_MACRO]["xticks"]) == sorted(t.budget for t in served.trials)
    for metric in set(drawn) & set(utility):  # the others (below the fold) may not be drawn yet
        assert drawn[metric]["points"] == finished, (metric, drawn[metric])
    # Each point in its init's colour (both trials are random-init; MLflow's own colours differ per run).
    red, green, blue = (int(ui.init_color("random")[i : i + 2], 16) for i in (1, 3, 5))
    colours = browser.evaluate(f"{POINT_COLOURS_JS}({json.dumps(M.TEST_AUROC_MACRO)})")
    assert colours == [f"rgb({red}, {green}, {blue})"] * finished, colours
    # Below: parallel coordinates (MLflow's own d3 chart) with the budget as a category axis, baseline included.
    browser.evaluate(
        f"document.querySelectorAll({json.dumps(CARD)}).forEach((c, i, all) => {{"
        " if (i === all.length - 1) c.scrollIntoView({block: 'center'}); })"
    )
    try:
        ticks = browser.wait_for(
            f"(() => {{ const ticks = Array.from(document.querySelectorAll('.parcoords .tick text'))"
            f".map(t => t.textContent); const want = {json.dumps(sorted(t.budget for t in served.trials))};"
            " return want.every(w => ticks.includes(w)) ? ticks : null; })()",
            PAGE_TIMEOUT_S,
            "a parallel-coordinates budget axis with every budget",
        )
    finally:
        capture(browser, screenshots / "mlflow-charts-parallel.png")
    assert "random" in ticks  # the init axis


# ---------------------------------------------------------------------------------------------------------
# The saved views themselves (no browser).


def test_views_name_the_headline_columns_and_fit_in_an_experiment_tag():
    externals = ["chexpert", "mimic", "padchest", "vindr", "nih"]  # the paper's five external sets
    for state in (ui.runs_view_state(externals), ui.charts_view_state(externals)):
        assert set(state) == set(ui.UI_STATE_DEFAULTS) | set(ui.SEARCH_FACETS_DEFAULTS)
        assert state["selectedColumns"] == [
            "metrics.`privacy/epsilon`",
            "metrics.`test/auroc_macro`",
            "metrics.`test/fairness/auroc_gap/sex`",
            "metrics.`test/fairness/auroc_gap/age`",
            *(f"metrics.`external/{name}/auroc_macro`" for name in externals),
            "params.`init`",
            "params.`budget`",
            "params.`max_grad_norm`",
            "params.`lr`",
        ]
        # groups: one per init x budget, never private and non-private runs in one average
        assert state["groupBy"]["groupByKeys"] == [
            {"mode": "param", "groupByData": "init"},
            {"mode": "param", "groupByData": "budget"},
        ]
        text = ui.envelope("view", state, 1, 2)
        assert len(text) <= ui.MAX_TAG_VALUE
        assert ui.read_envelope(text) == ("view", state, 1)
    charts = ui.charts_view_state(externals)["compareRunCharts"]
    scatters = [c for c in charts if c["type"] == "SCATTER"]
    assert [c["yaxis"]["key"] for c in scatters] == [M.TEST_AUROC_MACRO, *ui.headline_metrics(externals)[2:]]
    assert all(c["xaxis"] == {"key": BUDGET_PARAM, "type": "PARAM"} for c in scatters)
    assert M.EPSILON not in json.dumps(charts)  # non-private runs have none: a chart of it would drop them


def test_a_data_scale_sweep_charts_test_auroc_against_n_train():
    plain, scale = ui.charts_view_state(["nih"]), ui.charts_view_state(["nih"], data_scale=True)
    added = [c for c in scale["compareRunCharts"] if c not in plain["compareRunCharts"]]
    assert [(c["type"], c["xaxis"], c["yaxis"]) for c in added] == [
        ("SCATTER", {"key": "n_train", "type": "PARAM"}, {"key": M.TEST_AUROC_MACRO, "type": "METRIC"})
    ]
    assert len(ui.envelope("view", scale, 1, 2)) <= ui.MAX_TAG_VALUE


def test_the_runs_view_puts_the_headline_metrics_first_and_sizes_them_by_their_names():
    state = ui.runs_view_state(["padchest"])
    order = state["columnOrder"]
    assert order[:2] == [ui.RUN_NAME_COLUMN, ui.CREATED_COLUMN] and order[-1] == ui.DURATION_COLUMN
    assert order[2:-1] == state["selectedColumns"]
    widths = state["columnWidths"]
    assert set(widths) <= set(order)  # MLflow sizes only the columns of columnOrder
    assert widths[ui.column("metrics", M.TEST_AUROC_MACRO)] == ui.VALUE_WIDTH  # a short name: as wide as a value
    gap = M.auroc_gap("test", "sex")
    assert widths[ui.column("metrics", gap)] == ui.CHARACTER_WIDTH * len(gap) + ui.HEADER_PADDING
    # The metrics of the sweep's own test set end within a 1600-pixel window: 1600 less MLflow 3.17's side bar and
    # margins is the 1346 pixels the grid showed in headless Chromium, of which the check box column takes 73.
    pinned = 73 + widths[ui.RUN_NAME_COLUMN] + widths[ui.CREATED_COLUMN]
    assert pinned + sum(widths[ui.column("metrics", m)] for m in ui.headline_metrics()) <= 1346
    # On a first visit MLflow's Assistant panel leaves the grid 938 pixels: spent epsilon and test AUROC still fit.
    assert pinned + sum(widths[ui.column("metrics", m)] for m in (M.EPSILON, M.TEST_AUROC_MACRO)) <= 938


def test_each_init_has_its_colour():
    assert ui.init_color("random") != ui.init_color("domain")
    assert len(set(ui.INIT_COLORS.values())) == len(ui.INIT_COLORS)
    assert ui.init_color("convnext_small.fb_in22k") in ui.OTHER_INIT_COLORS  # stable: a hash of the name
    assert ui.init_color("convnext_small.fb_in22k") == ui.init_color("convnext_small.fb_in22k")
    assert not set(ui.OTHER_INIT_COLORS) & set(ui.INIT_COLORS.values())


def test_a_view_too_large_for_a_tag_is_refused():
    with pytest.raises(ValueError, match="more than a tag holds"):
        ui.envelope("view", ui.charts_view_state([f"dataset-{i:03d}" for i in range(200)]), 1, 1)


def test_publish_views_follows_the_store_and_rewrites_only_on_change(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("s")
    parent = client.create_run(experiment_id, run_name="s", tags={ROLE_TAG: "sweep", M.SWEEP_TAG: "s"})
    views = ui.publish_views(client, experiment_id, now_ms=1000)
    assert views == ui.view_paths("s", experiment_id)
    tags = client.get_experiment(experiment_id).tags
    name, state, created = ui.read_envelope(tags[ui.SHARE_TAG_PREFIX + ui.RUNS_VIEW])
    assert (name, created) == (ui.VIEW_NAMES[ui.RUNS_VIEW], 1000)
    assert state["selectedColumns"] == ui.headline_columns()
    # a trial with an external set: its column appears; the view keeps its creation time
    child = client.create_run(experiment_id, tags={ROLE_TAG: "trial", M.PARENT_TAG: parent.info.run_id})
    client.log_metric(child.info.run_id, M.external_auroc("padchest"), 0.7)
    ui.publish_views(client, experiment_id, now_ms=2000)
    text = client.get_experiment(experiment_id).tags[ui.SHARE_TAG_PREFIX + ui.RUNS_VIEW]
    assert (json.loads(text)["createdAt"], json.loads(text)["updatedAt"]) == (1000, 2000)
    assert ui.column("metrics", M.external_auroc("padchest")) in ui.read_envelope(text)[1]["selectedColumns"]
    ui.publish_views(client, experiment_id, now_ms=3000)  # nothing changed: nothing rewritten
    again = json.loads(client.get_experiment(experiment_id).tags[ui.SHARE_TAG_PREFIX + ui.RUNS_VIEW])
    assert again["updatedAt"] == 2000
    # trials get their init's colour; a colour picked in the UI (the same tag) stays; the parent run gets none
    picked = client.create_run(experiment_id, tags={ROLE_TAG: "trial", ui.RUN_COLOR_TAG: "#000000"})
    for run in (child, picked):
        client.log_param(run.info.run_id, "init", "domain")
    ui.publish_views(client, experiment_id, now_ms=4000)
    assert client.get_run(child.info.run_id).data.tags[ui.RUN_COLOR_TAG] == ui.init_color("domain")
    assert client.get_run(picked.info.run_id).data.tags[ui.RUN_COLOR_TAG] == "#000000"
    assert ui.RUN_COLOR_TAG not in client.get_run(parent.info.run_id).data.tags
    assert [v.experiment_id for v in ui.publish_sweep_views(client)] == [experiment_id]  # not the Default one


def test_dpsweep_ui_prints_the_views_of_each_sweep(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("paper")
    client.create_run(experiment_id, run_name="paper", tags={ROLE_TAG: "sweep", M.SWEEP_TAG: "paper"})
    lines = ui.sweep_view_lines(uri, "http://127.0.0.1:5123/")
    assert lines == [
        "MLflow UI on http://127.0.0.1:5123/ (Ctrl-C to stop)",
        "  sweep 'paper':",
        f"    runs   http://127.0.0.1:5123/#/experiments/{experiment_id}/runs?viewStateShareKey=dpsweep-runs",
        f"    charts http://127.0.0.1:5123/#/experiments/{experiment_id}/runs?viewStateShareKey=dpsweep-charts"
        "&compareRunsMode=CHART",
    ]
