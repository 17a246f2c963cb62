"""Dataset cards state images per patient (min, median, p99, max) and when ids are image ids (VinDr)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from trainables.data.cache import CARD_FILE, MANIFEST_FILE, dataset_card
from trainables.data.synthetic import prepare_synthetic


def test_card_states_images_per_patient_and_missing_patient_ids(tmp_path):
    out = prepare_synthetic("synthetic-a", tmp_path, size=32, n_images=200)
    card = json.loads((out / CARD_FILE).read_text())
    manifest = pd.read_parquet(out / MANIFEST_FILE)
    train = manifest[manifest["split"] == "train"]["patient_id"].value_counts()
    nearest_rank_p99 = int(np.sort(train.to_numpy())[int(np.ceil(0.99 * len(train))) - 1])
    assert card["splits"]["train"]["images_per_patient"] == {
        "patients": len(train),
        "min": int(train.min()),
        "median": float(train.median()),
        "p99": nearest_rank_p99,
        "max": int(train.max()),
    }
    assert 1 <= train.min() and train.max() <= 3  # the twin: 1-3 images per patient
    assert "patient_ids" not in card
    vindr_like = manifest.assign(patient_id=manifest["image_id"])  # VinDr: each image is its own patient
    vindr_card = dataset_card(vindr_like, 32)
    assert vindr_card["patient_ids"].startswith("none published: each image is its own patient")
    n_train = int((manifest["split"] == "train").sum())
    assert vindr_card["splits"]["train"]["images_per_patient"] == {
        "patients": n_train,
        "min": 1,
        "median": 1.0,
        "p99": 1,
        "max": 1,
    }
