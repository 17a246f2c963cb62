"""The final checkpoint a finished trial writes (`trainables.trial.write_final_checkpoint`): what `dpsweep release
--models` may publish from it must be the selected model's weights and nothing else."""

import json

import numpy as np
import pytest
import torch

from tests.factories import run_tiny_trial, tiny_trial_config
from trainables import names as M
from trainables.data.labels import LABELS
from trainables.data.loaders import load_trial_data
from trainables.models import create_model, load_weights, predict, resolve_init
from trainables.trial import write_final_checkpoint


@pytest.fixture(scope="module")
def private_run(tiny_site):
    cfg = tiny_trial_config(tiny_site, 4.0, epochs=2)
    return cfg, run_tiny_trial(cfg)


def test_the_final_checkpoint_holds_the_selected_weights_as_tensors_only(private_run, tmp_path):
    cfg, run = private_run
    metrics = {M.EPSILON: run.result.metrics[M.EPSILON], M.BEST_EPOCH: run.result.metrics[M.BEST_EPOCH]}
    write_final_checkpoint(tmp_path, run.result, metrics)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [M.FINAL_FILE, M.FINAL_WEIGHTS_FILE, *(f"{name}.parquet" for name in run.result.tables)]
    )
    assert json.loads((tmp_path / M.FINAL_FILE).read_text()) == metrics

    weights = load_weights(tmp_path / M.FINAL_WEIGHTS_FILE)  # safetensors: tensors by name, nothing executable
    model = run.result.model
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    assert set(weights) == names == set(model.state_dict())
    assert not any(k.startswith("_module.") for k in weights)  # the model itself, not Opacus' wrapper
    for key, value in model.state_dict().items():
        assert isinstance(weights[key], torch.Tensor) and torch.equal(weights[key], value.cpu()), key
    # No optimizer, accountant, generator state or seed: only what `state_dict` of the model holds.
    state = run.states[-1]
    assert set(weights).isdisjoint({"optimizer", "accountant", "sampler_rng", "noise_rng", "secret_seeds"})
    assert state["secret_seeds"] is not None  # the epoch checkpoint has seeds; the weights file cannot

    # They are the selected model: a fresh model loaded from the file scores the test split as the trial did.
    fresh = create_model(cfg.model, resolve_init("random", cfg.model))
    fresh.load_state_dict(weights, strict=True)
    scores, _ = predict(fresh, load_trial_data(cfg).test, 256)
    stored = run.result.tables["predictions"]
    stored = stored[stored["dataset"] == cfg.dataset]
    expected = stored[[M.prediction_score(label) for label in LABELS]].to_numpy()
    np.testing.assert_array_equal(scores.astype(np.float32), expected)
