"""Trial configs check themselves: every invalid value or pair raises `ConfigError` naming the field, wherever the
config is built; a sweep file reports the same problem at its own field path; flat keys and fingerprints are kept."""

import math
import pickle
import subprocess
import sys
from dataclasses import fields, replace

import pytest

from trainables.config import (
    MAX_BOOTSTRAP,
    MAX_IMAGE_SIZE,
    MAX_SEED,
    MAX_TARGET_EPSILON,
    MIN_DELTA,
    NESTED,
    ConfigError,
    DataSettings,
    EvaluationSettings,
    PretrainConfig,
    PrivacyConfig,
    SpeedConfig,
    TrainingSettings,
    TrialConfig,
)
from trainables.errors import UserError

FLAT_KEYS = [
    "accountant",
    "age_edges",
    "calibration_tolerance",
    "cuda_tuning",
    "data_on_device",
    "data_root",
    "dataset",
    "delta",
    "device",
    "epochs",
    "eval_batch_size",
    "expected_batch_size",
    "external_datasets",
    "fixed_shapes",
    "grad_sample_mode",
    "image_size",
    "init",
    "init_weights",
    "input_mean",
    "input_std",
    "label_count_noise_multiplier",
    "lr",
    "max_grad_norm",
    "max_images_per_patient",
    "max_physical_batch_size",
    "model",
    "model_selection",
    "n_boot",
    "noise_multiplier",
    "pad_multiple",
    "pos_weight",
    "precision",
    "privacy_unit",
    "reproducible_noise",
    "sample_rate",
    "secure_mode",
    "seed",
    "steps",
    "sweep",
    "target_epsilon",
    "test_every_epoch",
    "threads",
    "weight_decay",
]
"""`TrialConfig.to_flat`'s keys: Ray's param space, MLflow params and trials.parquet columns of sweeps on disk."""


def make(privacy=None, speed=None, **changes) -> TrialConfig:
    """A valid trial; ``privacy``/``speed``: changes of those sections, ``changes``: of the top-level fields."""
    return TrialConfig(
        **{
            "sweep": "s",
            "dataset": "synthetic-a",
            "data_root": "/d",
            "image_size": 64,
            "model": "test_convnext",
            "init": "random",
            "init_weights": None,
            "lr": 1e-3,
            "seed": 0,
            "external_datasets": ("synthetic-b",),
            **changes,
        },
        privacy=PrivacyConfig(**{"target_epsilon": 2.0, "max_grad_norm": 0.5, **(privacy or {})}),
        speed=SpeedConfig(**{"threads": 2, **(speed or {})}),
    )


PATIENT = {"privacy_unit": "patient", "max_images_per_patient": 3}


def test_a_valid_config_builds_and_round_trips_with_the_same_flat_keys():
    cfg = make()
    flat = cfg.to_flat()
    assert sorted(flat) == FLAT_KEYS
    assert flat["target_epsilon"] == 2.0 and flat["threads"] == 2 and flat["max_grad_norm"] == 0.5
    assert flat["external_datasets"] == ["synthetic-b"] and flat["age_edges"] == [0, 40, 70, 100]
    assert TrialConfig.from_flat(flat) == cfg


@pytest.mark.parametrize(
    "valid",
    [
        make(privacy={"target_epsilon": math.inf, "max_grad_norm": 0.0}),  # Optuna's non-private baselines clip nothing
        make(privacy=PATIENT, speed={"grad_sample_mode": "hooks"}),
        make(privacy=PATIENT),  # bk, the default engine, groups norms by patient
        make(privacy=PATIENT, speed={"precision": "bf16", "fixed_shapes": "on", "max_physical_batch_size": 8}),
        make(privacy={**PATIENT, "target_epsilon": math.inf}, speed={"grad_sample_mode": "functorch"}),
        make(age_edges=(0, 65, math.inf), n_boot=0),  # inf closes the last age bin
        make(pos_weight="train", privacy={"label_count_noise_multiplier": 20.0}),
        # Patient-level label counts: the release's sensitivity covers a patient's capped images.
        make(pos_weight="train", privacy={**PATIENT, "label_count_noise_multiplier": 20.0}),
        make(speed={"max_physical_batch_size": 8, "pad_multiple": 8}),
        # The ends of the ranges.
        make(privacy={"delta": MIN_DELTA, "target_epsilon": MAX_TARGET_EPSILON}, seed=MAX_SEED),
        make(privacy={"target_epsilon": 0.02, "calibration_tolerance": 0.01}),
        make(input_mean=1.0, input_std=0.01, image_size=MAX_IMAGE_SIZE, n_boot=MAX_BOOTSTRAP),
        make(lr=0.5, weight_decay=1.99),  # lr x weight_decay < 1
        make(train_fraction=0.25),  # a nested subset of the training patients
    ],
)
def test_valid_edge_cases_build_and_round_trip(valid):
    assert TrialConfig.from_flat(valid.to_flat()) == valid


def test_every_field_name_is_unique_across_the_nested_configs():
    """`to_flat` drops the section prefix, so a name may belong to one config only."""
    names = [f.name for f in fields(TrialConfig) if f.name not in NESTED]
    names += [f.name for kind in (PrivacyConfig, SpeedConfig) for f in fields(kind)]
    assert len(names) == len(set(names)) == len(FLAT_KEYS) + 2  # + train_fraction, proxy: flat only when set


def test_each_setting_is_declared_once():
    """The sections' settings are the trial's own fields (inherited), not copies of them."""
    for section in (DataSettings, TrainingSettings, EvaluationSettings):
        for f in fields(section):
            assert {g.name: g for g in fields(TrialConfig)}[f.name].default == f.default, f.name
    assert EvaluationSettings().n_boot == make().n_boot == 1000  # one default: what a sweep file gets


def test_unknown_keys_are_refused():
    with pytest.raises(KeyError, match="epsilon_target"):
        TrialConfig.from_flat({**make().to_flat(), "epsilon_target": 1})


INVALID = [
    # The pairs across sections.
    (
        {
            "privacy": {**PATIENT, "max_images_per_patient": 9},
            "speed": {"grad_sample_mode": "hooks", "max_physical_batch_size": 8},
        },
        "privacy.max_images_per_patient",
        r"= 9 exceeds speed\.max_physical_batch_size = 8: .* one physical batch",
    ),
    (
        {"privacy": {**PATIENT, "max_images_per_patient": None}, "speed": {"grad_sample_mode": "hooks"}},
        "privacy.max_images_per_patient",
        "= None: a patient-level trial needs the public cap",
    ),
    (
        {"privacy": {"max_images_per_patient": 3}},
        "privacy.max_images_per_patient",
        "is set but privacy.privacy_unit is",
    ),
    (
        {"privacy": {"label_count_noise_multiplier": 20.0}},
        "privacy.label_count_noise_multiplier",
        r"= 20\.0 is set but training\.pos_weight is 'uniform'",
    ),
    (
        {"privacy": {"secure_mode": True, "reproducible_noise": True}},
        "privacy.reproducible_noise",
        r"with privacy\.secure_mode = True: .* keep one",
    ),
    (
        {"speed": {"max_physical_batch_size": 8, "pad_multiple": 16}},
        "speed.pad_multiple",
        r"= 16 must be between 1 and speed\.max_physical_batch_size = 8",
    ),
    # Ranges: NaN and inf where not meaningful, signs, whole numbers.
    ({"lr": math.inf}, "lr", "= inf must be a finite number > 0"),
    ({"lr": math.nan}, "lr", "= nan must be a finite number > 0"),
    ({"lr": 0.0}, "lr", "= 0.0 must be a finite number > 0"),
    ({"seed": -1}, "seed", "must be a whole number >= 0"),
    ({"input_mean": math.nan}, "input_mean", "= nan must be a finite number"),
    ({"input_std": 0.0}, "input_std", "must be a finite number > 0"),
    ({"weight_decay": -0.1}, "weight_decay", r"= -0\.1 must be a finite number >= 0"),
    ({"weight_decay": math.inf}, "weight_decay", "= inf must be"),
    ({"image_size": 16}, "image_size", "= 16 must be a whole number >= 32"),
    ({"n_boot": -1}, "n_boot", "= -1 must be a whole number >= 0"),
    ({"n_boot": 2.5}, "n_boot", "whole number"),
    ({"age_edges": (50,)}, "age_edges", r"= \[50\]: give at least two edges"),
    ({"age_edges": ()}, "age_edges", "give at least two edges"),
    ({"age_edges": (0, 70, 40)}, "age_edges", r"= \[0, 70, 40\] must be strictly increasing"),
    ({"age_edges": (0, math.nan, 70)}, "age_edges", "must be numbers"),
    ({"dataset": ""}, "dataset", "must name the private training set"),
    ({"model": ""}, "model", "must name a timm architecture"),
    ({"init": ""}, "init", "must name an init"),
    ({"speed": {"eval_batch_size": -1}}, "speed.eval_batch_size", "= -1 must be a whole number >= 1"),
    ({"speed": {"threads": 0}}, "speed.threads", "whole number >= 1"),
    ({"speed": {"max_physical_batch_size": 0, "pad_multiple": 0}}, "speed.max_physical_batch_size", ">= 1"),
    ({"speed": {"pad_multiple": 0}}, "speed.pad_multiple", "must be between 1 and"),
    ({"privacy": {"delta": 0.0}}, "privacy.delta", r"must be in \(0, 1\)"),
    ({"privacy": {"delta": 1.0}}, "privacy.delta", r"must be in \(0, 1\)"),
    ({"privacy": {"delta": math.nan}}, "privacy.delta", r"must be in \(0, 1\)"),
    ({"privacy": {"target_epsilon": 0.0}}, "privacy.target_epsilon", r"must be > 0 \(use \.inf"),
    ({"privacy": {"target_epsilon": math.nan}}, "privacy.target_epsilon", "must be > 0"),
    ({"privacy": {"max_grad_norm": 0.0}}, "privacy.max_grad_norm", "= 0.0 must be a finite number > 0"),
    ({"privacy": {"max_grad_norm": math.inf}}, "privacy.max_grad_norm", "= inf must be a finite number > 0"),
    (
        {"privacy": {"target_epsilon": math.inf, "max_grad_norm": -1.0}},
        "privacy.max_grad_norm",
        "must be a finite number >= 0",
    ),
    ({"privacy": {"expected_batch_size": 0}}, "privacy.expected_batch_size", "whole number >= 1"),
    ({"privacy": {"epochs": 0}}, "privacy.epochs", "= 0 must be a whole number >= 1"),
    ({"privacy": {"epochs": 1.5}}, "privacy.epochs", "whole number"),
    ({"privacy": {"calibration_tolerance": 1.0}}, "privacy.calibration_tolerance", r"must be in \(0, 1\)"),
    (
        {"pos_weight": "train", "privacy": {"label_count_noise_multiplier": 0.0}},
        "privacy.label_count_noise_multiplier",
        "must be a finite number > 0: exact label counts",
    ),
    ({"privacy": {"noise_multiplier": -1.0}}, "privacy.noise_multiplier", "must be a finite number >= 0"),
    ({"privacy": {"noise_multiplier": math.inf}}, "privacy.noise_multiplier", "must be a finite number >= 0"),
    ({"privacy": {"sample_rate": 1.5}}, "privacy.sample_rate", r"must be in \[0, 1\]"),
    ({"privacy": {"steps": -1}}, "privacy.steps", "whole number >= 0"),
    # Numbers that would fail inside a trial, or that no accountant can work with.
    ({"seed": MAX_SEED + 1}, "seed", r"= 4294967296 must be at most 2\*\*32 - 1"),
    ({"input_mean": 1.5}, "input_mean", r"must be a finite number in \[0, 1\] \(pixels are in \[0, 1\]\)"),
    ({"input_mean": -0.5}, "input_mean", r"in \[0, 1\]"),
    ({"input_std": 2.0}, "input_std", r"= 2\.0 must be in \[0\.01, 1\]"),
    ({"input_std": 1e-300}, "input_std", r"must be in \[0\.01, 1\]"),
    ({"image_size": MAX_IMAGE_SIZE + 1}, "image_size", "must be at most 4096 pixels"),
    ({"n_boot": MAX_BOOTSTRAP + 1}, "n_boot", "must be at most 100000"),
    ({"age_edges": (-5, 40)}, "age_edges", r"= \[-5, 40\] must start at an age >= 0"),
    ({"age_edges": (-math.inf, 40)}, "age_edges", "must start at an age >= 0"),
    (
        {"lr": 0.5, "weight_decay": 2.0},
        "weight_decay",
        r"= 2\.0 with training\.lr = 0\.5: AdamW multiplies every weight by 1 - lr x weight_decay = 0 at each step",
    ),
    ({"privacy": {"delta": 1e-300}}, "privacy.delta", r"= 1e-300 is unreasonably small: below 1e-10"),
    ({"privacy": {"delta": 9e-11}}, "privacy.delta", "is unreasonably small"),
    ({"privacy": {"target_epsilon": 1e9}}, "privacy.target_epsilon", r"= 1000000000\.0 is too large to mean anything"),
    ({"privacy": {"target_epsilon": 100.5}}, "privacy.target_epsilon", "is too large"),
    (
        {"privacy": {"target_epsilon": 1e-9}},
        "privacy.target_epsilon",
        r"= 1e-09 is not above privacy\.calibration_tolerance = 0\.01",
    ),
    ({"privacy": {"target_epsilon": 0.01}}, "privacy.target_epsilon", "is not above privacy.calibration_tolerance"),
]


@pytest.mark.parametrize(
    ("changes", "field", "problem"), INVALID, ids=[f"{f}-{i}" for i, (_, f, _) in enumerate(INVALID)]
)
def test_invalid_configs_raise_naming_the_field(changes, field, problem):
    with pytest.raises(ConfigError, match=problem) as error:
        make(**changes)
    assert error.value.field == field
    assert str(error.value).startswith(f"{field} = ")


def test_a_config_changed_by_replace_is_checked_again():
    with pytest.raises(ConfigError, match="privacy.max_images_per_patient"):  # a cap above the physical batch
        replace(
            make(speed={"max_physical_batch_size": 2, "pad_multiple": 2}), privacy=replace(make().privacy, **PATIENT)
        )


def test_config_errors_are_user_errors_that_survive_pickling():
    """Ray sends a trial's exception to the driver pickled."""
    with pytest.raises(ConfigError) as error:
        make(lr=-1.0)
    assert isinstance(error.value, UserError) and isinstance(error.value, ValueError)
    again = pickle.loads(pickle.dumps(error.value))
    assert (again.field, again.value, str(again)) == ("lr", -1.0, str(error.value))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"epochs": 0}, "pretrain.epochs"),
        ({"lr": 0.0}, "pretrain.lr"),
        ({"batch_size": 0}, "pretrain.batch_size"),
        ({"weight_decay": -1.0}, "pretrain.weight_decay"),
        ({"init": "domain"}, "pretrain.init"),
        ({"dataset": ""}, "pretrain.dataset"),
        ({"input_std": -1.0}, "input_std"),
        ({"seed": MAX_SEED + 1}, "pretrain.seed"),
        ({"lr": 0.1, "weight_decay": 10.0}, "pretrain.weight_decay"),
    ],
)
def test_pretrain_configs_check_themselves(changes, field):
    with pytest.raises(ConfigError) as error:
        PretrainConfig(**{"dataset": "synthetic-source", **changes})
    assert error.value.field == field


# Sweep files: the same checks, reported at the sweep file's path.


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("training.weight_decay", -1, r"smoke\.yaml: training\.weight_decay = -1\.0 must be a finite number >= 0"),
        ("training.lr", [0.001, math.inf], r"training\.lr\[1\] = inf must be a finite number > 0"),
        ("training.seed", [0, -1], r"training\.seed\[1\] = -1 must be a whole number >= 0"),
        ("evaluation.n_boot", -1, r"evaluation\.n_boot = -1 must be a whole number >= 0"),
        ("evaluation.age_edges", [50], r"evaluation\.age_edges = \[50\.0\]: give at least two edges"),
        ("data.image_size", 16, r"data\.image_size = 16 must be a whole number >= 32"),
        ("data.input_mean", math.nan, r"data\.input_mean = nan must be a finite number"),
        ("speed.eval_batch_size", -1, r"speed\.eval_batch_size = -1 must be a whole number >= 1"),
        ("privacy.target_epsilon", [1, math.nan], r"privacy\.target_epsilon\[1\] = nan must be > 0"),
        ("pretrain.epochs", 0, r"pretrain\.epochs = 0 must be a whole number >= 1"),
        ("pretrain.init", "domain", r"pretrain\.init = 'domain': the pretrain stage makes the 'domain' init"),
    ],
)
def test_a_config_error_in_a_sweep_file_names_its_yaml_path(path, value, expected):
    from sweeps.spec import SpecError, parse_spec
    from tests.sweeps.sweep_files import edit

    with pytest.raises(SpecError, match=expected):
        parse_spec(edit(path, value), source="smoke.yaml")


def test_per_model_clip_norms_are_named_by_model_and_index():
    from sweeps.spec import SpecError, parse_spec
    from tests.sweeps.sweep_files import smoke_dict

    raw = smoke_dict()
    raw["model"] = ["test_convnext", "convnext_tiny"]
    raw["inits"] = ["random"]
    del raw["pretrain"]
    raw["privacy"]["max_grad_norm"] = {"test_convnext": [1.0], "convnext_tiny": [2.0, math.inf]}
    with pytest.raises(SpecError, match=r"privacy\.max_grad_norm\.convnext_tiny\[1\] = inf must be a finite number"):
        parse_spec(raw)


def test_every_grid_point_is_checked_not_only_the_first():
    """A clip norm of 0 is fine for the non-private baseline and refused for the private point of the same grid."""
    from sweeps.spec import SpecError, parse_spec
    from tests.sweeps.sweep_files import smoke_dict

    raw = smoke_dict()
    raw["privacy"] |= {"target_epsilon": [math.inf, 4.0], "max_grad_norm": [1.0, 0.0]}
    with pytest.raises(SpecError, match=r"privacy\.max_grad_norm\[1\] = 0\.0 must be a finite number > 0"):
        parse_spec(raw)


def test_optuna_sweeps_check_the_trial_of_every_cell():
    """No grid point exists before Optuna proposes: each cell's trial is built at the ends of the ranges."""
    import yaml

    from sweeps.spec import SpecError, parse_spec
    from tests.sweeps.sweep_files import OPTUNA

    raw = yaml.safe_load(OPTUNA.read_text())
    raw["privacy"]["label_count_noise_multiplier"] = 20
    with pytest.raises(SpecError, match=r"privacy\.label_count_noise_multiplier = 20\.0 is set but training\.pos_"):
        parse_spec(raw)
    raw["training"] = {"pos_weight": "train"}
    assert parse_spec(raw).privacy.label_count_noise_multiplier == 20


def test_the_sweep_privacy_section_holds_no_per_trial_placeholder():
    from sweeps.spec import load_spec
    from tests.sweeps.sweep_files import SMOKE

    spec = load_spec(SMOKE)
    per_trial = {"target_epsilon", "max_grad_norm", "privacy_unit", *PrivacyConfig.DERIVED}
    assert per_trial.isdisjoint(f.name for f in fields(spec.privacy))
    assert spec.axes.max_grad_norm == {"test_convnext": (1.0,)} and spec.axes.privacy_unit == ("image",)


def test_fingerprints_of_sweeps_started_before_are_kept():
    """The value an earlier dpsweep computed for this sweep file: a changed fingerprint refuses to resume it."""
    from sweeps.plan import spec_fingerprint
    from sweeps.spec import parse_spec

    raw = {
        "name": "fp",
        "data": {"train": "synthetic-a", "external": ["synthetic-b"]},
        "model": "test_convnext",
        "inits": ["random"],
        "privacy": {
            "target_epsilon": [1, math.inf],
            "max_grad_norm": [0.5, 2.0],
            "privacy_unit": ["image", "patient"],
            "max_images_per_patient": 3,
            "delta": 1e-5,
        },
        "training": {"lr": [0.001, 0.01], "pos_weight": "uniform"},
        "evaluation": {"n_boot": 50},
        "speed": {"grad_sample_mode": "hooks"},
    }
    assert spec_fingerprint(parse_spec(raw)) == "04ff350a11c76b89"


def test_validation_imports_the_types_not_the_parser():
    """No import cycle: `sweeps.schema` imports neither, `sweeps.validate` only the types."""
    code = (
        "import sys, sweeps.validate, sweeps.schema; "
        "assert 'sweeps.spec' not in sys.modules, 'sweeps.validate imports sweeps.spec'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("field", "value"),
    [("precision", "bf16"), ("fixed_shapes", "on"), ("data_on_device", "off"), ("cuda_tuning", False)],
)
def test_sweep_files_set_the_speed_knobs_under_speed(field, value):
    from sweeps.spec import parse_spec
    from tests.sweeps.sweep_files import smoke_dict

    raw = smoke_dict()
    raw["speed"] = {**raw.get("speed", {}), field: value}
    assert getattr(parse_spec(raw).speed, field) == value


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("precision", "fp16", r"speed\.precision = 'fp16'; choose one of \('fp32', 'bf16'\)"),
        ("fixed_shapes", True, r"speed\.fixed_shapes = True; choose one of \('auto', 'on', 'off'\)"),
        ("data_on_device", "yes", r"speed\.data_on_device = 'yes'; choose one of \('auto', 'on', 'off'\)"),
    ],
)
def test_bad_speed_knobs_are_refused_naming_field_value_and_choices(field, value, expected):
    from sweeps.spec import SpecError, parse_spec
    from tests.sweeps.sweep_files import smoke_dict

    raw = smoke_dict()
    raw["speed"] = {**raw.get("speed", {}), field: value}
    with pytest.raises(SpecError, match=expected):
        parse_spec(raw)


@pytest.mark.parametrize("knob", [{"grad_sample_mode": "bk"}, {"precision": "bf16"}, {"fixed_shapes": "on"}])
def test_patient_level_sweeps_take_every_engine_and_speed_knob(knob):
    # Patient-level chunks hold whole patients, in every engine, padded and in bf16 as image-level ones.
    from sweeps.spec import parse_spec
    from tests.sweeps.sweep_files import units_dict

    raw = units_dict()
    raw["speed"] = {**raw["speed"], **knob}
    spec = parse_spec(raw)
    patient = next(p for p in spec.grid() if p.privacy_unit == "patient")
    speed = spec.trial_config(patient, data_root="data").speed
    assert {field: getattr(speed, field) for field in knob} == knob


@pytest.mark.parametrize("multiple", [0, 65])
def test_pad_multiple_must_fit_the_physical_batch(multiple):
    from sweeps.spec import SpecError, parse_spec
    from tests.sweeps.sweep_files import smoke_dict

    raw = smoke_dict()
    raw["speed"] = {**raw.get("speed", {}), "max_physical_batch_size": 64, "pad_multiple": multiple}
    with pytest.raises(SpecError, match=rf"speed\.pad_multiple = {multiple} must be between 1 and"):
        parse_spec(raw)
