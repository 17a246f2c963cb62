"""The training loop of one trial: plain PyTorch + Opacus, no Ray. Read it top to bottom.

    load data -> build model from its init -> (private) wrap it, verify per-sample gradients
    -> for each epoch: Poisson-sampled DP-SGD steps -> validation AUROC + epsilon spent -> report/checkpoint
    -> final: pick the epoch (best validation AUROC), evaluate on test and external test sets.

`report(metrics, state)` is called once per epoch with a checkpointable ``state`` dict; the final metrics
and evaluation tables are returned. Resuming from a ``state`` continues with exactly the
same step count, accountant history and RNG streams.

Secure mode (``privacy.secure_mode``, private trials only): Poisson sampling and noise come from a
`SecureRandom` (ChaCha20 under a fresh ``os.urandom`` key) instead of seeded generators. There is nothing to
seed, checkpoint or restore for them: a resumed trial draws from a new key. That keeps the guarantee: the
steps lost with a killed process released nothing (a trial reports only together with its checkpoint), and
the steps after the resume use randomness that is independent of everything released so far and secret;
the step count and the accountant history are restored exactly as in the default mode, so the epsilon is
the same. What is lost is bit-for-bit reproducibility, on purpose.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from trainables import names as M
from trainables.config import TrialConfig
from trainables.data.cache import SplitData, open_cache
from trainables.data.labels import LABELS
from trainables.data.loaders import CacheSplitDataset, evaluation_batches
from trainables.evaluate.fairness import attribute_fairness, make_grouping
from trainables.evaluate.report import evaluate_split, fit_thresholds
from trainables.evaluate.utility import auroc_per_label, macro_mean
from trainables.models import ResolvedInit, create_model
from trainables.privacy.accounting import (
    create_accountant,
    cross_check_epsilon,
    epsilon_spent,
    sample_rate_and_steps,
)
from trainables.privacy.engine import (
    check_per_sample_gradients,
    make_dp_optimizer,
    poisson_batches,
    private_step,
    wrap_model,
)
from trainables.privacy.secure import SecureRandom

GRAD_CHECK_SAMPLES = 4
Report = Callable[[dict[str, Any], dict[str, Any] | None], None]


class BudgetError(RuntimeError):
    """Training would spend more epsilon than the trial's target."""


@dataclass
class TrialData:
    """The splits one trial uses, as memory-mapped datasets plus the demographics evaluation needs."""

    train: CacheSplitDataset
    val: CacheSplitDataset
    test: CacheSplitDataset
    external: dict[str, CacheSplitDataset] = field(default_factory=dict)


def dataset_path(data_root: str | Path, dataset: str, image_size: int) -> Path:
    return Path(data_root) / dataset / str(image_size)


def load_trial_data(cfg: TrialConfig) -> TrialData:
    def dataset(name: str, split: str) -> CacheSplitDataset:
        cache = open_cache(dataset_path(cfg.data_root, name, cfg.image_size))
        return CacheSplitDataset(cache.split(split), mean=cfg.input_mean, std=cfg.input_std)

    return TrialData(*(dataset(cfg.dataset, s) for s in ("train", "val", "test")),
                     external={name: dataset(name, "test") for name in cfg.external_datasets})


def label_pos_weight(cfg: TrialConfig, train_labels: np.ndarray) -> torch.Tensor | None:
    """Per-label positive weights for BCE.

    ``uniform``: none. ``train``: negatives/positives on the training split, as the study did; this reads
    label counts of the private training set outside the DP mechanism, so such runs are tagged
    ``pos_weight=train`` and the guarantee covers the model updates only.
    """
    if cfg.pos_weight == "uniform":
        return None
    if cfg.pos_weight == "train":
        positives = train_labels.sum(axis=0)
        return torch.tensor((len(train_labels) - positives) / np.maximum(positives, 1), dtype=torch.float32)
    raise ValueError(f"pos_weight={cfg.pos_weight!r}; choose 'uniform' or 'train'")


def per_sample_bce(pos_weight: torch.Tensor | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Multi-label BCE with logits, averaged over labels: one loss per sample."""

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(
            logits, targets, pos_weight=pos_weight, reduction="none"
        ).mean(dim=1)

    return loss


def macro_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Unweighted mean over labels of per-label AUROC (labels with one class in the split are skipped)."""
    return macro_mean(auroc_per_label(labels, scores))


def subgroup_auroc_gaps(labels: np.ndarray, scores: np.ndarray, split: SplitData,
                        age_edges: tuple[float, ...]) -> dict[str, float]:
    """Per attribute (``sex``, ``age``): max minus min of the groups' macro AUROCs.

    The definition of the final ``test/fairness/auroc_gap/<attribute>`` (`fairness.attribute_fairness`'s
    ``macro_auroc_gap``, on the same groupings as `evaluate_split`); NaN unless two groups have a defined macro
    AUROC. No thresholds and no bootstrap, so it is cheap enough for every epoch.
    """
    no_thresholds = np.full(labels.shape[1], np.nan)  # AUROC needs none; the thresholded columns come out NaN
    groupings = (make_grouping("sex", split.sex), make_grouping("age", split.age, edges=age_edges))
    return {grouping.attribute: attribute_fairness(labels, scores, no_thresholds, grouping, LABELS).macro_auroc_gap
            for grouping in groupings}


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when visible (Ray sets CUDA_VISIBLE_DEVICES to the trial's GPUs), else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("speed.device = cuda but no GPU is visible to this trial; give trials resources.gpu > 0")
    return torch.device(name)


@torch.no_grad()
def predict(model: nn.Module, dataset: CacheSplitDataset, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid scores [n, k] and labels [n, k] over a whole split."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores, labels = [], []
    for x, y in evaluation_batches(dataset, batch_size):
        scores.append(torch.sigmoid(model(x.to(device))).cpu().numpy())
        labels.append(y.numpy())
    model.train(was_training)
    return np.concatenate(scores), np.concatenate(labels)


def train_trial(cfg: TrialConfig, init: ResolvedInit, report: Report, state: dict[str, Any] | None = None,
                data: TrialData | None = None) -> dict[str, Any]:
    """Train and evaluate one trial.

    Returns:
        ``{"metrics": final metrics, "tables": {name: DataFrame}, "model": the selected epoch's model}``.
    """
    torch.set_num_threads(cfg.speed.threads)
    device = resolve_device(cfg.speed.device)
    privacy = cfg.privacy
    data = data or load_trial_data(cfg)
    n_train = len(data.train)
    if privacy.is_private:
        _check_planned_budget(cfg, n_train)
        planned_steps = privacy.steps
        steps_per_epoch = planned_steps // privacy.epochs

    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, init).to(device)
    model.train()
    pos_weight = label_pos_weight(cfg, data.train.split.labels)
    loss_fn = per_sample_bce(None if pos_weight is None else pos_weight.to(device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sampler_rng: torch.Generator | SecureRandom
    noise_rng: torch.Generator | SecureRandom
    if privacy.is_private and privacy.secure_mode:
        sampler_rng = noise_rng = SecureRandom()  # fresh OS key: nothing to seed or restore (module docstring)
    else:
        sampler_rng = torch.Generator().manual_seed(cfg.seed * 1000 + 1)  # Poisson sampling runs on the CPU
        noise_rng = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + 2)  # noise where the gradients are

    def batch(indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = data.train.batch(np.sort(indices))
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    accountant = None
    if privacy.is_private:
        wrapped = wrap_model(model, cfg.speed.grad_sample_mode)
        check_rows = torch.randperm(n_train, generator=torch.Generator().manual_seed(cfg.seed))[:GRAD_CHECK_SAMPLES]
        check_per_sample_gradients(wrapped, loss_fn, *batch(check_rows.numpy()))
        accountant = create_accountant(privacy.accountant)
        optimizer = make_dp_optimizer(
            optimizer,
            noise_multiplier=privacy.noise_multiplier,
            max_grad_norm=privacy.max_grad_norm,
            expected_batch_size=privacy.expected_batch_size,
            noise_generator=noise_rng,
            accountant=accountant,
            sample_rate=privacy.sample_rate,
        )
        net: nn.Module = wrapped
    else:
        net = model

    epoch, steps, history, best = 0, 0, [], {"val_auroc": -math.inf, "epoch": 0, "weights": None}
    if state is not None:
        epoch, steps, history, best = _restore(state, cfg, model, optimizer, accountant, sampler_rng, noise_rng)

    while epoch < privacy.epochs:
        losses = []
        if privacy.is_private:
            for indices in poisson_batches(n_train, privacy.sample_rate, steps_per_epoch, sampler_rng):
                if steps >= planned_steps:
                    raise BudgetError(f"step {steps + 1} would exceed the {planned_steps} planned steps")
                losses.append(private_step(net, optimizer, loss_fn, batch(indices.numpy()),
                                           cfg.speed.max_physical_batch_size))
                steps += 1
        else:
            order = torch.randperm(n_train, generator=sampler_rng)
            for start in range(0, n_train, privacy.expected_batch_size):
                x, y = batch(order[start : start + privacy.expected_batch_size].numpy())
                loss = loss_fn(model(x), y).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                steps += 1
        epoch += 1

        val_scores, val_labels = predict(model, data.val, cfg.speed.eval_batch_size)
        epoch_metrics = {
            M.EPOCH: epoch,
            M.STEPS: steps,
            M.TRAIN_LOSS: float(np.nanmean(losses)) if losses else math.nan,
            M.VAL_AUROC_MACRO: macro_auroc(val_labels, val_scores),
            M.EPSILON: accountant.get_epsilon(privacy.delta) if accountant else math.inf,
        }
        for attribute, gap in subgroup_auroc_gaps(val_labels, val_scores, data.val.split, cfg.age_edges).items():
            epoch_metrics[M.auroc_gap("val", attribute)] = gap
        if cfg.test_every_epoch:
            test_scores, test_labels = predict(model, data.test, cfg.speed.eval_batch_size)
            epoch_metrics[M.TEST_AUROC_MACRO_AT_EPOCH] = macro_auroc(test_labels, test_scores)
            test_gaps = subgroup_auroc_gaps(test_labels, test_scores, data.test.split, cfg.age_edges)
            for attribute, gap in test_gaps.items():
                epoch_metrics[M.auroc_gap_at_epoch(attribute)] = gap
        if privacy.is_private and epoch_metrics[M.EPSILON] > privacy.target_epsilon:
            raise BudgetError(f"epsilon spent {epoch_metrics[M.EPSILON]:.4f} > target {privacy.target_epsilon}")
        history.append(epoch_metrics)
        val_auroc = epoch_metrics[M.VAL_AUROC_MACRO]
        score = -math.inf if math.isnan(val_auroc) else val_auroc  # NaN: validation has a single class
        if best["weights"] is None or score > best["val_auroc"] or cfg.model_selection == "last":
            best = {"val_auroc": score, "epoch": epoch, "weights": copy.deepcopy(model.state_dict())}
        # What the trial would deliver if stopped now (ASHA's metric; the final report's selected value).
        epoch_metrics[M.VAL_SELECTED_AUROC_MACRO] = history[best["epoch"] - 1][M.VAL_AUROC_MACRO]
        report(epoch_metrics, _snapshot(cfg, epoch, steps, history, best, model, optimizer, accountant,
                                        sampler_rng, noise_rng))

    return _final_evaluation(cfg, data, model, best, history, accountant, steps)


def _check_planned_budget(cfg: TrialConfig, n_train: int) -> None:
    """Refuse to start unless the driver's (sigma, q, steps) match this data and end at or below the target."""
    privacy = cfg.privacy
    expected_q, planned_steps = sample_rate_and_steps(n_train, privacy.expected_batch_size, privacy.epochs)
    if privacy.sample_rate != expected_q or privacy.steps != planned_steps:
        raise BudgetError(
            f"trial config was calibrated for q={privacy.sample_rate}, steps={privacy.steps} but the data gives "
            f"q={expected_q}, steps={planned_steps} (N={n_train}); re-run the sweep so sigma is recalibrated"
        )
    planned = epsilon_spent(privacy.noise_multiplier, privacy.sample_rate, planned_steps, privacy.delta,
                            privacy.accountant)
    if planned > privacy.target_epsilon:
        raise BudgetError(f"sigma={privacy.noise_multiplier} spends epsilon {planned:.4f} > target "
                          f"{privacy.target_epsilon} over {planned_steps} steps")


def _snapshot(cfg, epoch, steps, history, best, model, optimizer, accountant, sampler_rng, noise_rng
              ) -> dict[str, Any]:
    """Everything needed to resume exactly: weights, optimizer, privacy ledger, RNG streams (None for a
    `SecureRandom`, which has no state to save)."""
    original = getattr(optimizer, "original_optimizer", optimizer)
    return {
        "config": cfg.to_flat(),
        "epoch": epoch,
        "steps": steps,
        "history": history,
        "best": best,
        "model": model.state_dict(),
        "optimizer": original.state_dict(),
        "accountant": accountant.state_dict() if accountant else None,
        "sampler_rng": _generator_state(sampler_rng),
        "noise_rng": _generator_state(noise_rng),
        "torch_rng": torch.get_rng_state(),
    }


def _generator_state(rng: torch.Generator | SecureRandom) -> torch.Tensor | None:
    return rng.get_state() if isinstance(rng, torch.Generator) else None


RESUME_IGNORED_KEYS = ("data_root",)
"""Config keys that may differ between a checkpoint and its resume (a moved data folder changes nothing)."""


def _restore(state, cfg, model, optimizer, accountant, sampler_rng, noise_rng):
    saved, current = state["config"], cfg.to_flat()
    changed = sorted(k for k in set(saved) | set(current)
                     if k not in RESUME_IGNORED_KEYS and saved.get(k) != current.get(k))
    if changed:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in changed)
        raise ValueError(f"checkpoint belongs to a different trial configuration ({details}); refusing to resume")
    model.load_state_dict(state["model"])
    getattr(optimizer, "original_optimizer", optimizer).load_state_dict(state["optimizer"])
    if accountant is not None:
        accountant.load_state_dict(state["accountant"])
        _check_ledger(accountant, cfg, state["steps"])
    for rng, saved_rng in ((sampler_rng, state["sampler_rng"]), (noise_rng, state["noise_rng"])):
        if isinstance(rng, torch.Generator):  # a SecureRandom keeps its fresh key (module docstring)
            rng.set_state(saved_rng)
    torch.set_rng_state(state["torch_rng"])
    return state["epoch"], state["steps"], list(state["history"]), state["best"]


def _check_ledger(accountant, cfg: TrialConfig, steps: int) -> None:
    """The restored accountant must account for exactly the steps taken, at the trial's (sigma, q): a lost or
    foreign ledger would under-report epsilon silently."""
    history = accountant.history
    recorded = sum(n for _, _, n in history)
    mechanisms = {(sigma, q) for sigma, q, _ in history}
    expected = {(cfg.privacy.noise_multiplier, cfg.privacy.sample_rate)}
    if recorded != steps or (history and mechanisms != expected):
        raise BudgetError(
            f"checkpoint's privacy ledger records {recorded} steps at {sorted(mechanisms)} but the trial took {steps} "
            f"steps at {sorted(expected)}; refusing to resume with an inconsistent ledger"
        )


def _final_evaluation(cfg, data, model, best, history, accountant, steps) -> dict[str, Any]:
    """Test and external-test metrics of the selected epoch's weights; thresholds fitted on validation."""
    privacy = cfg.privacy
    model.load_state_dict(best["weights"])
    val_scores, val_labels = predict(model, data.val, cfg.speed.eval_batch_size)
    thresholds = fit_thresholds(val_labels, val_scores)
    test_scores, test_labels = predict(model, data.test, cfg.speed.eval_batch_size)
    split = data.test.split
    evaluation = evaluate_split(
        test_labels, test_scores, sex=split.sex, age=split.age, thresholds=thresholds,
        age_edges=cfg.age_edges, n_boot=cfg.n_boot, boot_seed=_dataset_seed(cfg.dataset), prefix="test",
    )
    metrics = dict(evaluation.metrics)
    metrics[M.BEST_EPOCH] = best["epoch"]
    metrics[M.STEPS] = steps
    selected = history[best["epoch"] - 1]  # the selected epoch's validation numbers: Optuna's objectives
    metrics[M.VAL_SELECTED_AUROC_MACRO] = selected[M.VAL_AUROC_MACRO]
    for attribute in ("sex", "age"):
        metrics[M.val_selected_auroc_gap(attribute)] = selected.get(M.auroc_gap("val", attribute), math.nan)
    if privacy.is_private:
        _check_ledger(accountant, cfg, steps)
        metrics[M.EPSILON] = accountant.get_epsilon(privacy.delta)
        metrics[M.EPSILON_AT_BEST_EPOCH] = history[best["epoch"] - 1][M.EPSILON]
        cross = cross_check_epsilon(privacy.noise_multiplier, privacy.sample_rate, steps, privacy.delta)
        metrics[M.EPSILON_CROSS_CHECK_RDP] = cross["rdp"]
        metrics[M.EPSILON_CROSS_CHECK_PLD] = cross["pld"]
    else:
        metrics[M.EPSILON] = math.inf
        metrics[M.EPSILON_AT_BEST_EPOCH] = math.inf
    tables = {"groups": [evaluation.groups.assign(dataset=cfg.dataset)],
              "bootstrap": [evaluation.bootstrap.reset_index().assign(dataset=cfg.dataset)]}
    for name, dataset in data.external.items():
        ext_scores, ext_labels = predict(model, dataset, cfg.speed.eval_batch_size)
        external = evaluate_split(
            ext_labels, ext_scores, sex=dataset.split.sex, age=dataset.split.age, thresholds=thresholds,
            age_edges=cfg.age_edges, n_boot=cfg.n_boot, boot_seed=_dataset_seed(name), prefix=f"external/{name}",
        )
        metrics.update(external.metrics)
        tables["groups"].append(external.groups.assign(dataset=name))
        tables["bootstrap"].append(external.bootstrap.reset_index().assign(dataset=name))
    tables = {name: pd.concat(parts, ignore_index=True) for name, parts in tables.items()}
    tables["epochs"] = pd.DataFrame(history)
    return {"metrics": metrics, "tables": tables, "model": model}


def _dataset_seed(dataset: str) -> int:
    """A fixed bootstrap seed per dataset, so every trial of a sweep resamples its test set identically."""
    import zlib

    return zlib.crc32(dataset.encode())
