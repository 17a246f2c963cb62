"""Sweep-file validation: every bad input fails before Ray starts, naming the field, the value and the fix."""

import dataclasses
import math
import re
from pathlib import Path

import pytest
import yaml

from sweeps.spec import SpecError, load_spec, parse_spec, read_sweep_yaml
from sweeps.validate import RDP_ORDERS, rdp_epsilon_floor
from tests.sweeps.sweep_files import OPTUNA, SMOKE, edit, smoke_dict


def test_smoke_spec_is_valid_and_expands_to_the_grid():
    spec = load_spec(SMOKE)
    grid = spec.grid()
    axes = spec.axes
    assert len(grid) == len(spec.inits) * len(axes.target_epsilon) * len(axes.max_grad_norm["test_convnext"]) * len(
        axes.lr
    ) * len(axes.seed)
    assert {p.init for p in grid} == {"random", "domain"}
    assert {p.target_epsilon for p in grid} == {1.0, 3.0, 8.0, math.inf}


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("privacy.target_epsilon", [1, 0], r"privacy\.target_epsilon\[1\] = 0\.0 must be > 0 \(use \.inf"),
        ("privacy.target_epsilon", [-2], r"privacy\.target_epsilon\[0\] = -2\.0 must be > 0"),
        ("privacy.max_grad_norm", [0], r"privacy\.max_grad_norm\[0\] = 0\.0 must be a finite number > 0"),
        ("privacy.delta", 1.5, r"privacy\.delta = 1\.5 must be in \(0, 1\)"),
        ("privacy.accountant", "gdp", r"privacy\.accountant = 'gdp'; choose one of \('rdp', 'prv'\)"),
        ("privacy.epochs", 0, r"privacy\.epochs = 0 must be a whole number >= 1"),
        ("privacy.expected_batch_size", "lots", r"`privacy\.expected_batch_size` = 'lots' is not a valid int"),
        ("inits", ["random", "imagenett"], r"inits\[1\]: unknown init 'imagenett'"),
        ("data.train", "chexpertt", r"data\.train\[0\]: unknown dataset 'chexpertt'"),
        ("data.train", ["synthetic-a", "synthetic-a"], r"data\.train lists a dataset twice"),
        ("model", ["test_convnext", "test_convnext"], r"model lists a name twice"),
        (
            "privacy.max_grad_norm",
            {"convnext_tiny": 1.0},
            r"privacy\.max_grad_norm\.convnext_tiny: 'convnext_tiny' is not",
        ),
        ("privacy.accountant", True, r"privacy\.accountant = True; choose one of"),
        ("privacy.noise_multiplier", 1.0, r"`privacy\.noise_multiplier` cannot be set in a sweep file: it is derived"),
        ("training.pos_weight", "balanced", r"training\.pos_weight = 'balanced'; choose one of \('uniform', 'train'\)"),
        ("search", "bayes", r"search = 'bayes'; choose one of \('grid', 'optuna', 'private_selection', 'proxy'\)"),
        ("speed.grad_sample_mode", "ghost", r"speed\.grad_sample_mode = 'ghost'; choose one of"),
        ("training.lr", [0.001, -1], r"training\.lr\[1\] = -1\.0 must be a finite number > 0"),
        ("evaluation.age_edges", [0, 70, 40], r"evaluation\.age_edges = \[0\.0, 70\.0, 40\.0\] must be strictly"),
    ],
)
def test_bad_fields_are_named_with_value_and_fix(path, value, expected):
    with pytest.raises(SpecError, match=expected):
        parse_spec(edit(path, value), source="smoke.yaml")


def test_unknown_fields_suggest_the_right_name():
    raw = smoke_dict()
    raw["privacy"]["epsilon"] = raw["privacy"].pop("target_epsilon")
    with pytest.raises(SpecError, match=r"unknown field `privacy\.epsilon`; did you mean `privacy\.target_epsilon`"):
        parse_spec(raw)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("privacy.epsilons", "privacy.target_epsilon"),
        ("privacy.clip_norms", "privacy.max_grad_norm"),
        ("training.learning_rates", "training.lr"),
        ("training.seeds", "training.seed"),
    ],
)
def test_renamed_fields_name_their_new_spelling(old, new):
    raw = smoke_dict()
    section, leaf = old.split(".")
    raw[section][leaf] = raw[section].pop(new.split(".")[1])
    with pytest.raises(SpecError, match=rf"`{re.escape(old)}` was renamed `{re.escape(new)}`"):
        parse_spec(raw)


def test_one_name_from_the_sweep_file_to_the_trial_config(tmp_path):
    """Every grid axis and every privacy/speed field of the sweep file is the TrialConfig field it sets."""
    from sweeps.plan import DatasetPlan, SweepPaths, cell_privacy, make_trial, trial_name
    from trainables.models import ResolvedInit
    from trainables.privacy.planning import plan_privacy

    raw = smoke_dict()
    raw["privacy"] |= {"max_grad_norm": [0.7], "secure_mode": True, "expected_batch_size": 16}
    raw["speed"] |= {"max_physical_batch_size": 8, "grad_sample_mode": "functorch"}
    raw["training"] |= {"lr": [0.004], "seed": [3]}
    spec = parse_spec(raw)
    paths = SweepPaths(tmp_path, tmp_path, "sqlite:///x.db")
    point = next(p for p in spec.grid() if p.target_epsilon == 3)
    trial = make_trial(
        spec,
        paths,
        DatasetPlan("synthetic-a", 1000, 0.016, 189),
        ResolvedInit("random", "random", "test_convnext", None),
        point,
        trial_name(spec, point),
        privacy=plan_privacy(cell_privacy(spec, 3.0, "image"), 1000, noise_multiplier=1.1),
        provenance_tags={},
    )
    flat = trial.config.to_flat()
    for section in ("privacy", "speed"):
        for key, value in raw[section].items():
            if key == "target_epsilon":
                continue
            expected = value[0] if isinstance(value, list) else value
            assert flat[key] == expected, key
    assert (flat["target_epsilon"], flat["lr"], flat["seed"]) == (3.0, 0.004, 3)
    assert trial.params["max_grad_norm"] == 0.7 and trial.params["noise_multiplier"] == 1.1


def test_missing_required_field():
    raw = smoke_dict()
    del raw["model"]
    with pytest.raises(SpecError, match="required field `model` is missing"):
        parse_spec(raw)


def test_domain_init_needs_a_public_pretrain_dataset():
    raw = smoke_dict()
    del raw["pretrain"]
    with pytest.raises(SpecError, match="init 'domain' needs a `pretrain:` section"):
        parse_spec(raw)
    with pytest.raises(SpecError, match="is a private training set"):
        parse_spec(edit("pretrain.dataset", "synthetic-a"))


def test_init_weights_must_name_a_used_init():
    with pytest.raises(SpecError, match=r"init_weights\.dinov3 names an init that the sweep does not use"):
        parse_spec({**smoke_dict(), "init_weights": {"dinov3": "/x.safetensors"}})


def test_timm_tag_inits_must_match_the_model():
    with pytest.raises(SpecError, match="is a weight tag for 'convnext_small' but the sweep's model is"):
        parse_spec(edit("inits", ["convnext_small.dinov3_lvd1689m"]))


def test_malformed_yaml_names_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nprivacy:\n  target_epsilon: [1, 3\n  delta: 1e-6\n")
    with pytest.raises(SpecError, match=r"bad\.yaml: malformed YAML at line \d+, column \d+"):
        load_spec(bad)


def test_missing_sweep_file(tmp_path):
    with pytest.raises(SpecError, match="does not exist; pass a path such as sweeps/smoke.yaml"):
        load_spec(tmp_path / "nope.yaml")


def test_non_mapping_yaml(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="expected a mapping of sections"):
        load_spec(bad)


PAPER = Path(__file__).resolve().parents[2] / "sweeps" / "paper.yaml"


def test_paper_spec_is_the_reference_grid():
    spec = load_spec(PAPER)
    assert spec.models == ("convnext_small", "convnext_tiny")
    assert spec.data.train == ("vindr-cxr", "chestxray14", "padchest", "chexpert", "uka-cxr")
    assert spec.inits == ("imagenet", "dinov3", "domain") and spec.pretrain.dataset == "mimic-cxr"
    assert spec.privacy.delta == 6e-6 and spec.axes.lr == (5e-6, 1e-5)
    grid = spec.grid()
    assert len(grid) == 2 * 5 * 3 * 4 * 2
    assert {(p.model, p.max_grad_norm) for p in grid} == {("convnext_small", 4.0), ("convnext_tiny", 3.5)}
    bins = sorted({p.target_epsilon for p in grid})
    assert bins[0] <= 1 < bins[1] <= 3 < bins[2] <= 10 and math.isinf(bins[3])
    assert spec.resources.gpu == 1


def test_clip_norms_as_a_mapping_needs_every_model():
    raw = yaml.safe_load(PAPER.read_text())
    raw["privacy"]["max_grad_norm"] = {"convnext_small": 4.0}
    with pytest.raises(SpecError, match=r"privacy\.max_grad_norm has no entry for model 'convnext_tiny'; add"):
        parse_spec(raw)


def test_init_weights_can_name_one_file_per_model():
    raw = {**yaml.safe_load(PAPER.read_text()), "init_weights": {"imagenet": "/w/{model}.fb_in1k.safetensors"}}
    spec = parse_spec(raw)
    assert spec.init_weights_for("imagenet", "convnext_tiny") == "/w/convnext_tiny.fb_in1k.safetensors"
    assert spec.init_weights_for("dinov3", "convnext_tiny") is None


def test_optuna_smoke_spec_is_valid():
    spec = load_spec(OPTUNA)
    assert spec.search == "optuna" and spec.optuna.objectives == ("auroc",)
    assert len(spec.cells()) == 2 and spec.early_stopping.method == "asha"


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        (
            "privacy",
            "max_grad_norm",
            [1.0],
            r"`privacy\.max_grad_norm` is a grid setting; with `search: optuna` "
            r"give the range `optuna\.max_grad_norm`",
        ),
        ("training", "lr", [1e-3], r"`training\.lr` is a grid setting"),
        ("optuna", "noise_multiplier", [3.0, 1.0], r"optuna\.noise_multiplier = \[3\.0, 1\.0\]: give \[low, high\]"),
        ("optuna", "objectives", ["auroc", "loss"], r"optuna\.objectives\[1\] = 'loss'; choose one of"),
        ("optuna", "sampler", "cmaes", r"optuna\.sampler = 'cmaes'"),
        ("optuna", "trials_per_target", 0, r"optuna\.trials_per_target = 0 must be >= 1"),
        ("training", "seed", [0, 1], r"training\.seed = \[0, 1\]: search: optuna uses one seed"),
        ("early_stopping", "reduction_factor", 1, r"early_stopping\.reduction_factor = 1 must be >= 2"),
    ],
)
def test_bad_optuna_settings_are_named(section, key, value, expected):
    raw = yaml.safe_load(OPTUNA.read_text())
    raw.setdefault(section, {})[key] = value
    with pytest.raises(SpecError, match=expected):
        parse_spec(raw, source="optuna-smoke.yaml")


def test_optuna_section_needs_search_optuna():
    raw = yaml.safe_load(OPTUNA.read_text())
    raw["search"] = "grid"
    with pytest.raises(SpecError, match=r"an `optuna:` section is given but search = 'grid'"):
        parse_spec(raw)


def test_secure_and_reproducible_noise_together_are_refused():
    raw = smoke_dict()
    raw["privacy"] |= {"secure_mode": True, "reproducible_noise": True}
    with pytest.raises(SpecError, match=r"privacy\.reproducible_noise = True with privacy\.secure_mode = True: they"):
        parse_spec(raw)


def test_label_count_noise_is_only_for_pos_weight_train_and_never_zero():
    raw = smoke_dict()
    raw["privacy"]["label_count_noise_multiplier"] = 20
    with pytest.raises(SpecError, match=r"label_count_noise_multiplier = 20.0 is set but training\.pos_weight is"):
        parse_spec(raw)
    raw["training"]["pos_weight"] = "train"
    assert parse_spec(raw).privacy.label_count_noise_multiplier == 20
    raw["privacy"]["label_count_noise_multiplier"] = 0
    with pytest.raises(SpecError, match="must be a finite number > 0: exact label counts"):
        parse_spec(raw)


def test_private_pos_weight_train_trials_are_calibrated_with_their_label_count_release(tmp_path):
    from sweeps.plan import DatasetPlan, SweepPaths, cell_privacy, make_trial, trial_name
    from trainables.models import ResolvedInit
    from trainables.privacy.planning import plan_privacy

    raw = smoke_dict()
    raw["training"]["pos_weight"] = "train"
    spec = parse_spec(raw)
    paths = SweepPaths(tmp_path, tmp_path, "sqlite:///x.db")
    init = ResolvedInit("random", "random", "test_convnext", None)
    configs = {
        p.target_epsilon: make_trial(
            spec,
            paths,
            DatasetPlan("synthetic-a", 1777, 1 / 56, 168),
            init,
            p,
            trial_name(spec, p),
            privacy=plan_privacy(cell_privacy(spec, p.target_epsilon, "image"), 1777),
            provenance_tags={},
        ).config
        for p in spec.grid()
        if p.init == "random"
    }
    assert configs[1.0].privacy.label_count_noise_multiplier == 20.0  # the default release
    assert configs[math.inf].privacy.label_count_noise_multiplier is None  # a baseline counts exactly
    plain = plan_privacy(dataclasses.replace(configs[1.0].privacy, label_count_noise_multiplier=None), 1777)
    assert configs[1.0].privacy.noise_multiplier > plain.noise_multiplier  # calibrated with the release


# Reading the file strictly (`sweeps.spec.SweepLoader`); the refusals themselves are in test_bad_inputs.py.


def test_yaml_1_1_words_stay_strings_and_only_true_and_false_are_booleans(tmp_path):
    """``fixed_shapes: on`` is the setting ``on``, not YAML 1.1's boolean True (which the field would refuse)."""
    text = yaml.safe_dump(smoke_dict()).replace("  threads: 1\n", "  threads: 1\n  fixed_shapes: on\n")
    text = text.replace("  test_every_epoch: true\n", "  test_every_epoch: false\n")
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    spec = load_spec(path)
    assert spec.speed.fixed_shapes == "on"
    assert spec.evaluation.test_every_epoch is False
    assert read_sweep_yaml(_written(tmp_path, "a: yes\nb: No\nc: off\nd: TRUE\n")) == {
        "a": "yes",
        "b": "No",
        "c": "off",
        "d": True,
    }


def _written(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "some.yaml"
    path.write_text(text)
    return path


def test_merge_keys_keep_their_meaning_and_duplicates_are_found_at_any_depth(tmp_path):
    merged = "base: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 3\n"
    assert read_sweep_yaml(_written(tmp_path, merged)) == {"base": {"x": 1, "y": 2}, "c": {"x": 3, "y": 2}}
    deep = "a:\n- b: 1\n- b: 2\n  c: {d: [1, {e: 1, e: 2}]}\n"
    with pytest.raises(SpecError, match=r"`a\[1\]\.c\.d\[1\]\.e` is given twice \(line 4: 1, line 4: 2\)"):
        read_sweep_yaml(_written(tmp_path, deep))


def test_a_utf8_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "smoke.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + SMOKE.read_bytes())
    assert load_spec(path).name == "smoke"


def test_the_rdp_floor_is_opacus_own():
    """`rdp_epsilon_floor` spells out Opacus's orders and conversion so that validation needs no Opacus: tie both,
    and check the floor is what calibration meets (targets just above it calibrate, just below do not)."""
    from opacus.accountants import RDPAccountant

    from trainables.privacy.accounting import calibrate_noise_multiplier, epsilon_spent

    assert list(RDP_ORDERS) == RDPAccountant.DEFAULT_ALPHAS
    floor = rdp_epsilon_floor(6e-6)
    assert floor == pytest.approx(0.1111, abs=1e-4)
    assert rdp_epsilon_floor(1e-10) == pytest.approx(0.2886, abs=1e-4)
    assert floor < epsilon_spent(1e4, 1 / 8, 16, 6e-6, "rdp") < floor + 1e-6
    assert calibrate_noise_multiplier(1.05 * floor, 6e-6, 1 / 8, 16, tolerance=0.001) > 0
    with pytest.raises(ValueError, match="unreachable"):
        calibrate_noise_multiplier(0.999 * floor, 6e-6, 1 / 8, 16, tolerance=0.001)
