"""The ledger's store (append-only files beside the dataset), what a sweep records, and `dpsweep ledger`."""

from __future__ import annotations

import dataclasses
import math
import stat
from concurrent.futures import ThreadPoolExecutor

import pytest

from sweeps.cli import main
from sweeps.ledger import PlannedRun, describe_ledger, mark_runs, record_runs
from trainables.config import PrivacyConfig
from trainables.data.ledger import LedgerError, append_entries, ledger_dir, read_ledger
from trainables.privacy.ledger import compose_ledger
from trainables.privacy.planning import plan_privacy

N = 1770
PLANNED = plan_privacy(PrivacyConfig(target_epsilon=1.0, delta=6e-6, expected_batch_size=32, epochs=3), N)


def planned(run: str, privacy: PrivacyConfig = PLANNED, sweep: str = "smoke") -> PlannedRun:
    return PlannedRun(run=run, sweep=sweep, trial=run.split("/")[-1], privacy=privacy, patient_images=3)


def test_rows_are_appended_as_new_files_and_read_back_in_order(tmp_path):
    assert read_ledger(tmp_path, "synthetic-a") == []
    assert record_runs(tmp_path, "synthetic-a", [planned("s/1"), planned("s/2")]) == 2
    first_files = sorted(ledger_dir(tmp_path, "synthetic-a").iterdir())
    before = {path: path.read_bytes() for path in first_files}
    assert record_runs(tmp_path, "synthetic-a", [planned("s/2"), planned("s/3")]) == 1  # s/2 is known
    files = sorted(ledger_dir(tmp_path, "synthetic-a").iterdir())
    assert len(files) == 2 and all(path.read_bytes() == content for path, content in before.items())  # untouched
    rows = read_ledger(tmp_path, "synthetic-a")
    assert [row.run for row in rows] == ["s/1", "s/2", "s/3"]
    assert rows[0].noise_multiplier == PLANNED.noise_multiplier and rows[0].steps == PLANNED.steps == 168
    assert rows[0].private and rows[0].status == "planned" and rows[0].patient_images == 3


def test_a_non_private_baseline_is_recorded_without_a_guarantee(tmp_path):
    baseline = plan_privacy(dataclasses.replace(PLANNED, target_epsilon=math.inf), N)
    reproducible = dataclasses.replace(PLANNED, reproducible_noise=True)
    record_runs(tmp_path, "d", [planned("s/inf", baseline), planned("s/rep", reproducible), planned("s/1")])
    total = compose_ledger(read_ledger(tmp_path, "d"))
    assert (total.private_runs, total.non_private_runs) == (1, 2)


def test_replaced_runs_stay_composed(tmp_path):
    record_runs(tmp_path, "d", [planned("s/a/1")])
    mark_runs(tmp_path, "d", read_ledger(tmp_path, "d"), "replaced")
    record_runs(tmp_path, "d", [planned("s/b/1")])  # the --fresh rerun: a new run
    total = compose_ledger(read_ledger(tmp_path, "d"))
    assert total.runs == 2 and total.statuses == {"replaced": 1, "planned": 1}


def test_concurrent_appends_lose_nothing(tmp_path):
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: append_entries(tmp_path, "d", [_entry(f"r{i}")]), range(40)))
    assert sorted(row.run for row in read_ledger(tmp_path, "d")) == sorted(f"r{i}" for i in range(40))
    assert not [p for p in ledger_dir(tmp_path, "d").iterdir() if p.suffix != ".jsonl"]  # no temporary left


def _entry(run: str):
    from trainables.privacy.ledger import entry_for

    return entry_for(
        PLANNED,
        run=run,
        kind="trial",
        sweep="s",
        trial=run,
        status="planned",
        patient_images=3,
        time="t",
        user="u",
        host="h",
    )


def test_a_malformed_row_is_named_with_its_file_and_line(tmp_path):
    path = append_entries(tmp_path, "d", [_entry("r1")])
    assert path is not None
    path.chmod(stat.S_IWUSR | stat.S_IRUSR)
    path.write_text(path.read_text() + '{"run": "x"}\n')
    with pytest.raises(LedgerError, match=rf"{path.name}, line 2: not a ledger entry"):
        read_ledger(tmp_path, "d")


def test_an_unwritable_ledger_is_a_user_error_naming_the_folder(tmp_path):
    folder = ledger_dir(tmp_path, "d")
    folder.parent.mkdir(parents=True)
    folder.write_text("not a folder")  # fails for root too, unlike a read-only folder
    with pytest.raises(LedgerError, match=rf"cannot append to the privacy ledger {folder}"):
        append_entries(tmp_path, "d", [_entry("r1")])


def test_dpsweep_ledger_prints_the_composition(tmp_path, capsys):
    (tmp_path / "synthetic-a").mkdir()
    assert main(["ledger", "synthetic-a", "--data", str(tmp_path)]) == 0
    assert "no run recorded yet" in capsys.readouterr().out
    record_runs(tmp_path, "synthetic-a", [planned("s/1"), planned("s/2", sweep="other")])
    assert main(["ledger", "synthetic-a", "--data", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    total = compose_ledger(read_ledger(tmp_path, "synthetic-a"))
    assert f"epsilon {total.epsilon_rdp:.4g} (RDP)" in out and "2 runs (2 with a DP guarantee, 0 without)" in out
    assert out == describe_ledger(tmp_path, "synthetic-a") + "\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ledger", "nope"], "no prepared dataset 'nope'"),
        (["ledger", "synthetic-a", "--delta", "2"], "--delta 2.0 must be in (0, 1)"),
    ],
)
def test_dpsweep_ledger_refuses_bad_input_with_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "synthetic-a").mkdir()
    assert main([*argv, "--data", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_a_selection_is_recorded_once_and_rows_written_before_it_still_read(tmp_path):
    import json

    from trainables.privacy.selection import TrialCount, plan_selection

    plan = plan_selection(PLANNED, N, [(32, 3), (64, 3)], TrialCount("poisson", 3.0))
    record_runs(tmp_path, "d", [dataclasses.replace(planned("s/cell"), selection=plan), planned("s/1")])
    old = {k: v for k, v in dataclasses.asdict(read_ledger(tmp_path, "d")[1]).items() if not k.startswith("selection")}
    (ledger_dir(tmp_path, "d") / "0000-old.jsonl").write_text(json.dumps(old | {"run": "s/old"}) + "\n")
    rows = {row.run: row for row in read_ledger(tmp_path, "d")}
    cell = rows["s/cell"]
    assert cell.selection_mean == 3.0 and cell.selection_shape is None  # Poisson: infinite shape, stored as None
    assert cell.selection_candidates == tuple(
        (p.noise_multiplier, p.sample_rate, p.steps) for p in plan.candidates.values()
    )
    assert rows["s/old"].selection_mean is None  # a row from before private selection: an ordinary run
    assert compose_ledger([cell]).epsilon_rdp >= plan.epsilon  # the composed candidates bound their maximum
