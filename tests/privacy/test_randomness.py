"""Secret randomness: a private trial's noise and Poisson sampling are seeded from ``os.urandom``, never from the
published ``cfg.seed``; the seeds live only in checkpoints (resume stays exact) and in no released output; the
private batch loss is never released. Each test fails if that breaks."""

import dataclasses
import io
import math
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from tests.asserts import assert_identical
from tests.factories import TinyRun, run_tiny_trial, split_system_metrics, tiny_trial_config
from trainables import names as M
from trainables.config import PrivacyConfig, TrialConfig
from trainables.data.loaders import load_trial_data
from trainables.privacy import randomness
from trainables.privacy.guarantee import (
    NO_GUARANTEE_NON_PRIVATE,
    NO_GUARANTEE_SEED_PUBLISHED,
    guarantee_statement,
    has_dp_guarantee,
)
from trainables.privacy.randomness import generator_from_seed, mechanism_randomness, randomness_mode

# ----------------------------------------------------------------------------------------------------
# The sources


def test_cpu_generator_from_a_seed_uses_every_bit_of_it():
    seed = 0x1234_5678_9ABC_DEF0_0FED_CBA9_8765_4321
    # why generator_from_seed exists: torch's CPU generator keeps only the low 32 bits of manual_seed
    assert torch.equal(
        torch.rand(8, generator=torch.Generator().manual_seed(5)),
        torch.rand(8, generator=torch.Generator().manual_seed(5 + 2**32)),
    )
    draws = {s: torch.rand(8, generator=generator_from_seed(s)) for s in (seed, seed ^ 2**40, seed ^ 2**127)}
    assert len({tuple(d.tolist()) for d in draws.values()}) == 3, "a high bit of the seed was ignored"
    assert torch.equal(torch.rand(8, generator=generator_from_seed(seed)), draws[seed])  # deterministic
    z = torch.randn(200_000, generator=generator_from_seed(seed))
    assert abs(z.mean().item()) < 5 / math.sqrt(z.numel()) and abs(z.std().item() - 1) < 5 / math.sqrt(2 * z.numel())


def test_default_mode_seeds_come_from_os_urandom_not_from_cfg_seed(monkeypatch):
    privacy = PrivacyConfig(target_epsilon=2.0)
    draws = iter([bytes([1]) * 16, bytes([2]) * 16, bytes([1]) * 16, bytes([2]) * 16])
    monkeypatch.setattr(randomness.os, "urandom", lambda n: next(draws))
    a = mechanism_randomness(privacy, seed=0, device=torch.device("cpu"))
    b = mechanism_randomness(privacy, seed=7, device=torch.device("cpu"))  # another public seed: same streams
    assert a.mode == "default" and a.secret_seeds == {
        "sampler": int.from_bytes(bytes([1]) * 16, "little"),
        "noise": int.from_bytes(bytes([2]) * 16, "little"),
    }
    assert torch.equal(torch.rand(5, generator=a.sampler), torch.rand(5, generator=b.sampler))
    assert torch.equal(torch.randn(5, generator=a.noise), torch.randn(5, generator=b.noise))
    assert "secret" not in repr(a) and str(a.secret_seeds["sampler"]) not in repr(a)
    monkeypatch.undo()
    fresh = [mechanism_randomness(privacy, 0, torch.device("cpu")).secret_seeds for _ in range(2)]
    assert fresh[0] != fresh[1]


def test_modes():
    assert randomness_mode(PrivacyConfig(target_epsilon=math.inf, reproducible_noise=True)) == "non_private"
    assert randomness_mode(PrivacyConfig(target_epsilon=1.0)) == "default"
    assert randomness_mode(PrivacyConfig(target_epsilon=1.0, secure_mode=True)) == "secure"
    assert randomness_mode(PrivacyConfig(target_epsilon=1.0, reproducible_noise=True)) == "reproducible"
    with pytest.raises(ValueError, match="exclude each other"):
        randomness_mode(PrivacyConfig(target_epsilon=1.0, secure_mode=True, reproducible_noise=True))
    non_private = mechanism_randomness(PrivacyConfig(target_epsilon=math.inf), 3, torch.device("cpu"))
    assert non_private.noise is None and non_private.secret_seeds is None  # shuffling stays seeded by cfg.seed
    assert torch.equal(
        torch.randperm(9, generator=non_private.sampler),
        torch.randperm(9, generator=torch.Generator().manual_seed(3001)),
    )


# ----------------------------------------------------------------------------------------------------
# The guarantee in words


def test_guarantee_statement():
    private = PrivacyConfig(target_epsilon=2.0, delta=1e-5, noise_multiplier=1.1, sample_rate=1 / 9, steps=27)
    text = guarantee_statement(private, 144)
    for part in (
        "(2, 1e-05)-DP",
        "unit: one image",
        "add/remove adjacency",
        "N=144 treated as public",
        "accountant rdp",
        "os.urandom",
        "validation-based epoch selection",
        "tuning across trials",
    ):
        assert part in text, part
    with_counts = dataclasses.replace(private, label_count_noise_multiplier=20.0)
    assert "pos_weight" not in text
    assert "release of the training label counts (noise multiplier 20) for pos_weight=train, composed" in (
        guarantee_statement(with_counts, 144, pos_weight="train")
    )
    assert "ChaCha20" in guarantee_statement(PrivacyConfig(target_epsilon=2.0, secure_mode=True), 144)
    replayable = PrivacyConfig(target_epsilon=2.0, reproducible_noise=True)
    assert guarantee_statement(replayable, 144).startswith(NO_GUARANTEE_SEED_PUBLISHED)
    assert NO_GUARANTEE_SEED_PUBLISHED == "none (noise seed published)"
    assert guarantee_statement(PrivacyConfig(target_epsilon=math.inf), 144) == NO_GUARANTEE_NON_PRIVATE
    assert [has_dp_guarantee(p) for p in (private, replayable, PrivacyConfig(target_epsilon=math.inf))] == [
        True,
        False,
        False,
    ]


# ----------------------------------------------------------------------------------------------------
# Trials


def val_aurocs(run: TinyRun) -> list[float]:
    return [e[M.VAL_AUROC_MACRO] for e in run.epochs]


def test_two_runs_of_a_private_trial_draw_different_noise_and_batches(tiny_site):
    cfg = tiny_trial_config(tiny_site)
    first, second = run_tiny_trial(cfg), run_tiny_trial(cfg)
    assert val_aurocs(first) != val_aurocs(second)
    for key in ("sampler_rng", "noise_rng", "secret_seeds"):
        assert first.states[-1][key] is not None and not _equal(first.states[-1][key], second.states[-1][key]), key
    # the same ledger: the randomness changes nothing in the accounting
    assert [e[M.EPSILON] for e in first.epochs] == [e[M.EPSILON] for e in second.epochs]


def test_two_runs_of_a_non_private_trial_are_identical(tiny_site):
    cfg = tiny_trial_config(tiny_site, math.inf)
    first, second = run_tiny_trial(cfg), run_tiny_trial(cfg)
    assert_identical(second.epochs, first.epochs, "epochs")
    assert_identical(second.states[-1], first.states[-1], "final checkpoint")
    assert second.states[-1]["noise_rng"] is None and second.states[-1]["secret_seeds"] is None


def test_reproducible_noise_replays_the_published_seed(tiny_site):
    cfg = tiny_trial_config(tiny_site, reproducible_noise=True)
    first, second = run_tiny_trial(cfg), run_tiny_trial(cfg)
    assert_identical(second.epochs, first.epochs, "epochs")
    assert_identical(second.states[-1], first.states[-1], "final checkpoint")
    assert first.states[-1]["secret_seeds"] is None
    # the sampler is cfg.seed's stream (seed * 1000 + 1): replayable by anyone from the logged config
    published = _advanced(torch.Generator().manual_seed(cfg.seed * 1000 + 1), cfg)
    assert torch.equal(first.states[-1]["sampler_rng"], published)
    default = run_tiny_trial(tiny_trial_config(tiny_site))
    assert not torch.equal(default.states[-1]["sampler_rng"], published)


def test_a_private_trial_releases_no_seed_and_no_private_batch_loss(tiny_site, capfd):
    cfg = tiny_trial_config(tiny_site)
    run = run_tiny_trial(cfg)
    printed = "".join(capfd.readouterr())
    seeds = run.states[-1]["secret_seeds"]
    # the seeds are the real ones: the checkpointed sampler is exactly the sampler seed's stream, advanced
    assert torch.equal(run.states[-1]["sampler_rng"], _advanced(generator_from_seed(seeds["sampler"]), cfg))

    released = [*run.epochs, *run.system, run.result.metrics, *(_cells(t) for t in run.result.tables.values())]
    assert not any(M.TRAIN_LOSS in e for e in run.epochs)
    assert M.TRAIN_LOSS not in run.result.tables["epochs"].columns
    forbidden = set()
    for seed in seeds.values():
        forbidden |= {
            seed,
            seed & (2**32 - 1),
            seed & (2**64 - 1),
            seed >> 64,
            seed >> 96,
            int(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0]),
        }
    numbers = [v for v in _leaves(released) if isinstance(v, int | float | np.number) and not isinstance(v, bool)]
    assert numbers and not forbidden & {int(v) for v in numbers if math.isfinite(v) and float(v).is_integer()}
    texts = [str(v) for v in _leaves(released) if isinstance(v, str)] + [printed]
    for seed in seeds.values():
        for form in (str(seed), hex(seed)[2:], str(seed & (2**32 - 1))):
            assert not any(form in text for text in texts)
    # the key name is right: a non-private trial does report its training loss
    assert M.TRAIN_LOSS in run_tiny_trial(tiny_trial_config(tiny_site, math.inf, epochs=1)).epochs[0]


def test_default_mode_resumes_the_same_secret_streams_bit_exactly(tiny_site):
    cfg = tiny_trial_config(tiny_site, epochs=3, model_selection="last")
    uninterrupted = run_tiny_trial(cfg)
    buffer = io.BytesIO()
    torch.save(uninterrupted.states[0], buffer)  # through the bytes a checkpoint is, as in a new process
    buffer.seek(0)
    resumed = run_tiny_trial(cfg, state=torch.load(buffer, weights_only=False))
    assert [e[M.EPOCH] for e in resumed.epochs] == [2, 3]
    assert_identical(resumed.epochs, uninterrupted.epochs[1:], "epochs after the resume")
    assert_identical(  # not the runs' training seconds: timing differs
        split_system_metrics(resumed.result.metrics)[0],
        split_system_metrics(uninterrupted.result.metrics)[0],
        "final metrics",
    )
    assert_identical(resumed.states[-1], uninterrupted.states[-1], "final checkpoint")
    for name, table in uninterrupted.result.tables.items():
        pd.testing.assert_frame_equal(resumed.result.tables[name], table, check_exact=True, obj=name)
    # not just seeded alike: another run of the same config differs
    assert val_aurocs(run_tiny_trial(cfg)) != val_aurocs(uninterrupted)


# ----------------------------------------------------------------------------------------------------


def _advanced(generator: torch.Generator, cfg: TrialConfig) -> torch.Tensor:
    """The state of a sampler after the trial's Poisson draws (one ``torch.rand(n)`` per step)."""
    n_train = len(load_trial_data(cfg).train)
    for _ in range(cfg.privacy.steps):
        torch.rand(n_train, generator=generator)
    return generator.get_state()


def _equal(a: Any, b: Any) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def _cells(table: pd.DataFrame) -> list[Any]:
    return [*table.columns, *table.to_numpy().ravel().tolist()]


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in (*_leaves(k), *_leaves(v))]
    if isinstance(value, list | tuple):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def test_leaves_sees_nested_values():  # the leak check above looks everywhere it should
    assert _leaves([{"a": (1, {"b": 2.5})}, "x"]) == ["a", 1, "b", 2.5, "x"]
    assert _cells(pd.DataFrame({"c": [3]})) == ["c", 3]
