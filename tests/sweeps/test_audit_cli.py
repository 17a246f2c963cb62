"""`dpsweep audit`: plans the sweep's private cells as the sweep would and audits them; results everywhere."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from sweeps.cli import main
from sweeps.spec import SpecError, parse_spec
from tests.sweeps.tiny import tiny_spec
from trainables import names as N
from trainables.data.ledger import read_ledger
from trainables.privacy.audit import AuditResult, epsilon_ceiling
from trainables.privacy.ledger import compose_ledger


def write_spec(tmp_path, **audit):
    raw = tiny_spec(
        name="audited",
        data={"synthetic_images": 300},
        privacy={"target_epsilon": [2, 8, math.inf], "epochs": 1},
        audit={"m": 200, "real_records": 16, "target_epsilon": [2], **audit},
    )
    path = tmp_path / "audited.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_audit_reports_a_lower_bound_beside_the_claim_in_the_table_mlflow_and_console(tmp_path, capsys):
    spec_file = write_spec(tmp_path)
    runs, data = tmp_path / "runs", tmp_path / "data"
    assert main(["audit", str(spec_file), "--runs", str(runs), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "eps lower bound" in out and "audit table:" in out
    table = pd.read_parquet(runs / "audited" / N.AUDIT_FILE)
    assert list(table["trial"]) == ["random-eps2-clip1-lr0.002-seed0"]  # only the named target; first grid point
    row = table.iloc[0]
    assert row["kind"] == "white_box" and row["m"] == 200 and row["confidence"] == 0.95  # one audit: no correction
    assert row["audits"] == 1 and row["family_confidence"] == 0.95 and row["holm_p_value"] == row["claim_p_value"]
    assert 0 <= row["epsilon_lower_bound"] <= row["claimed_epsilon"] <= 2.0 and not row["violates_claim"]
    assert (
        row["epsilon_lower_bound"]
        <= row["epsilon_ceiling"]
        == epsilon_ceiling(200, delta=row["delta"], confidence=0.95)
    )
    assert "bk engine's per-layer rules never see them" in out
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("audited")
    (run,) = client.search_runs([experiment.experiment_id], f"tags.`{N.ROLE_TAG}` = 'audit'")
    assert run.data.tags[N.AUDITED_TRIAL_TAG] == row["trial"] and N.TRIAL_KEY_TAG not in run.data.tags
    assert run.data.metrics[N.audit_metric("white_box", "epsilon_lower_bound")] == pytest.approx(
        row["epsilon_lower_bound"]
    )
    assert run.data.metrics[N.audit_metric("white_box", "holm_p_value")] == pytest.approx(row["holm_p_value"])
    assert run.data.tags[f"{N.TAG_PREFIX}audit_violates_claim"] == "False"


# Hand-made claim p-values of 2 cells x 2 kinds. Holm: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03,
# 0.06, 0.04 -> adjusted 0.02, 0.03, 0.06, 0.06: two refuted at 0.05 (Bonferroni, p < 0.0125, would refute one).
CLAIM_P_VALUES = {
    (2.0, "white_box"): 0.01,
    (2.0, "black_box"): 0.04,
    (8.0, "white_box"): 0.005,
    (8.0, "black_box"): 0.03,
}


def test_a_family_of_audits_is_bonferroni_bounded_and_holm_refuted(tmp_path, monkeypatch, capsys):
    import trainables.audit

    asked = []

    def fake_audit(cfg, init, *, m, kind, confidence, real_records, record):
        asked.append(confidence)
        record(cfg.privacy)  # as the real runners do before training
        claim = cfg.privacy.target_epsilon
        return AuditResult(
            kind,
            m,
            10,
            9,
            0.5,
            confidence,
            claim,
            1e-5,
            0.1,
            "sum",
            1.0,
            0.1,
            10,
            "bk",
            claim_p_value=CLAIM_P_VALUES[(claim, kind)],
            epsilon_ceiling=3.0,
        )

    monkeypatch.setattr(trainables.audit, "run_audit", fake_audit)
    spec_file = write_spec(tmp_path, target_epsilon=[], kind=["white_box", "black_box"])
    runs, data = tmp_path / "runs", tmp_path / "data"
    assert main(["audit", str(spec_file), "--runs", str(runs), "--data", str(data)]) == 1
    assert asked == [pytest.approx(1 - 0.05 / 4)] * 4  # every bound at beta / 4
    table = pd.read_parquet(runs / "audited" / N.AUDIT_FILE)
    by_cell = table.set_index(["target_epsilon", "kind"])
    expected = {(2.0, "white_box"): 0.03, (2.0, "black_box"): 0.06, (8.0, "white_box"): 0.02, (8.0, "black_box"): 0.06}
    for cell, holm in expected.items():
        assert by_cell.loc[cell, "holm_p_value"] == pytest.approx(holm)
        assert by_cell.loc[cell, "violates_claim"] == (holm < 0.05)
    assert (table["audits"] == 4).all() and (table["family_confidence"] == 0.95).all()
    # each audit is a run on the training split: recorded in its ledger before it trained, finished after
    ledger = read_ledger(data, "synthetic-a")
    audit_runs = {entry.run for entry in ledger if entry.kind == "audit"}
    assert len(audit_runs) == 4 and compose_ledger(ledger).statuses == {"finished": 4}
    out = capsys.readouterr().out
    assert "Bonferroni over the 4 audit(s)" in out and "CLAIM REFUTED for 2 audit(s)" in out
    assert "Black-box audits trained through the trial's own engine (bk)" in out
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("audited")
    audits = client.search_runs([experiment.experiment_id], f"tags.`{N.ROLE_TAG}` = 'audit'")
    assert sorted(r.data.tags[f"{N.TAG_PREFIX}audit_violates_claim"] for r in audits) == [
        "False",
        "False",
        "True",
        "True",
    ]


@pytest.mark.parametrize(
    ("audit", "message"),
    [
        ({"target_epsilon": [3]}, r"audit\.target_epsilon\[0\] = 3 is not one of the sweep's private targets"),
        ({"m": 5}, r"audit\.m = 5 canaries must be >= 10"),
        ({"kind": ["white_box", "grey_box"]}, r"audit\.kind\[1\] = 'grey_box'; choose one of"),
        ({"confidence": 1.5}, r"audit\.confidence = 1\.5 must be in \(0, 1\)"),
    ],
)
def test_bad_audit_sections_are_named(tmp_path, audit, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(yaml.safe_load(write_spec(tmp_path, **audit).read_text()))


def test_the_audit_section_does_not_change_the_sweep_fingerprint(tmp_path):
    from sweeps.plan import spec_fingerprint

    with_audit = parse_spec(yaml.safe_load(write_spec(tmp_path).read_text()))
    without = parse_spec({k: v for k, v in yaml.safe_load(write_spec(tmp_path).read_text()).items() if k != "audit"})
    assert spec_fingerprint(with_audit) == spec_fingerprint(without)


def test_a_units_sweep_audits_each_privacy_unit_of_a_cell():
    from sweeps.audit import audited_trials
    from sweeps.spec import AuditSpec
    from tests.sweeps.points import planned_points
    from tests.sweeps.sweep_files import units_dict

    spec = parse_spec(units_dict())
    chosen = audited_trials(spec, planned_points(spec), AuditSpec(target_epsilon=(3.0,)))
    assert sorted(t.config.privacy.privacy_unit for t in chosen) == ["image", "patient"]
    assert {t.key for t in chosen} == {
        "random-eps3-clip1-lr0.0005-seed0-image",
        "random-eps3-clip1-lr0.0005-seed0-patient",
    }


def test_a_patient_level_audit_claims_and_bounds_the_patient_epsilon(tmp_path, capsys):
    raw = yaml.safe_load(write_spec(tmp_path).read_text())
    raw["privacy"] |= {"privacy_unit": "patient", "max_images_per_patient": 3}
    spec_file = tmp_path / "audited.yaml"
    spec_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    runs, data = tmp_path / "runs", tmp_path / "data"
    assert main(["audit", str(spec_file), "--runs", str(runs), "--data", str(data)]) == 0
    row = pd.read_parquet(runs / "audited" / N.AUDIT_FILE).iloc[0]
    assert row["privacy_unit"] == "patient" and row["kind"] == "white_box"
    assert 0 <= row["epsilon_lower_bound"] <= row["claimed_epsilon"] <= 2.0 and not row["violates_claim"]
    (entry,) = [e for e in read_ledger(data, "synthetic-a") if e.kind == "audit" and e.status == "planned"]
    assert entry.privacy_unit == "patient" and entry.sample_rate == row["sample_rate"]
    assert entry.label_count_noise_multiplier is None  # the white-box audit releases no label counts
    assert "Patient-level audits (unit patient)" in capsys.readouterr().out
