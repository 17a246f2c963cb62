"""The privacy ledger end to end: two sweeps, an audit and a `--fresh` rerun on one synthetic training set compose, in
`dpsweep ledger`, to dp-accounting's composition of every private run they made (taken from their own trial and audit
tables, not from the ledger)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import yaml
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant

from sweeps.audit import run_audits
from sweeps.cli import main
from sweeps.launch import run_sweep
from sweeps.ledger import sweep_ledger_text
from sweeps.plan import SweepPaths
from sweeps.spec import parse_spec
from tests.sweeps.tiny import tiny_spec
from trainables import names as N
from trainables.data.ledger import read_ledger
from trainables.privacy.ledger import compose_ledger

pytestmark = pytest.mark.slow


def events_of(trials: pd.DataFrame) -> list[dp_event.DpEvent]:
    """Each private trial's event, from its own trial table (sigma, q, planned steps, label-count release)."""
    events: list[dp_event.DpEvent] = []
    for row in trials[trials["target_epsilon"].map(math.isfinite)].itertuples():
        steps = dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(row.sample_rate, dp_event.GaussianDpEvent(row.noise_multiplier)), row.steps
        )
        sigma_c = row.label_count_noise_multiplier
        events.append(
            steps
            if sigma_c is None or pd.isna(sigma_c)
            else dp_event.ComposedDpEvent([dp_event.GaussianDpEvent(sigma_c), steps])
        )
    return events


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    import ray

    root = tmp_path_factory.mktemp("ledger")
    first = tiny_spec(privacy={"target_epsilon": [2, math.inf], "epochs": 1}, evaluation={"n_boot": 0})
    other = tiny_spec(name="other", privacy={"target_epsilon": [3], "epochs": 1}, training={"pos_weight": "train"})
    specs = [parse_spec(yaml.safe_load(yaml.safe_dump(raw)), source=f"{raw['name']}.yaml") for raw in (first, other)]
    paths = [SweepPaths.for_spec(spec, runs=str(root / "runs"), data=str(root / "data")) for spec in specs]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        tables = [run_sweep(specs[0], paths[0]), run_sweep(specs[1], paths[1])]
        audit = run_audits(specs[0], paths[0], kinds=("white_box",), m=20, log=lambda line: None)
        tables.append(run_sweep(specs[0], paths[0], fresh=True))
    finally:
        ray.shutdown()
    yield root, specs, tables, audit


def test_the_ledger_composes_every_private_run_of_every_sweep_and_audit(three_runs, capsys):
    root, specs, (first, other, rerun), audit = three_runs
    entries = read_ledger(root / "data", "synthetic-a")
    total = compose_ledger(entries)
    assert (total.runs, total.private_runs, total.non_private_runs) == (6, 4, 2)  # baselines counted apart
    assert total.by_sweep == {"tiny": 5, "other": 1}  # two trials, the audit, the rerun's two trials
    assert total.statuses == {"replaced": 2, "finished": 4}  # --fresh replaced the first run's two trials
    (white_box,) = audit.itertuples()
    audit_event = dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(white_box.sample_rate, dp_event.GaussianDpEvent(white_box.noise_multiplier)),
        white_box.steps,
    )
    expected = RdpAccountant()
    for event in [*events_of(first), *events_of(other), audit_event, *events_of(rerun)]:
        expected.compose(event)
    assert total.epsilon_rdp == pytest.approx(expected.get_epsilon(total.delta), rel=1e-9)
    # at least every sweep's own tuning epsilon; the rerun's first run is not in its own
    own = pd.read_parquet(root / "runs" / "tiny" / N.TRIALS_FILE)
    assert total.epsilon_rdp > own.loc[own["target_epsilon"] == 2, N.EPSILON].iloc[0]
    assert main(["ledger", "synthetic-a", "--data", str(root / "data")]) == 0
    printed = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert f"epsilon {total.epsilon_rdp:.4g} (RDP)" in printed
    assert "6 runs (4 with a DP guarantee, 2 without)" in printed
    summary = " ".join(sweep_ledger_text(root / "data", ["synthetic-a"]).split())
    assert f"epsilon {total.epsilon_rdp:.4g} (RDP)" in summary and "`dpsweep ledger synthetic-a`" in summary


def test_the_sweep_records_its_ledger_total_beside_its_tables(three_runs):
    import json

    root, _, _, _ = three_runs
    summary = json.loads((root / "runs" / "tiny" / N.LEDGER_SUMMARY_FILE).read_text())
    total = compose_ledger(read_ledger(root / "data", "synthetic-a"))
    assert summary["synthetic-a"]["epsilon_rdp"] == pytest.approx(total.epsilon_rdp, rel=1e-12)
