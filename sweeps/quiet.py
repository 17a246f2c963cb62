"""Ray Tune's and MLflow's known console noise, switched off at its source when the driver module loads (before
Ray is imported): exact environment switches and exact log lines, never whole loggers, levels or warning classes."""

from __future__ import annotations

import logging
import os

QUIET_RAY_ENVIRONMENT = {
    # Tune warns when one result takes > 0.5 s to process; our driver-side MLflow callback writes each epoch
    # report synchronously (about 1 s on a busy 2-core machine, once per trial epoch): expected, not a bottleneck.
    "TUNE_WARN_THRESHOLD_S": "10",
    # Tune's "Configuration for experiment" box and "View detailed results": our ProgressCallback prints progress.
    "RAY_AIR_NEW_OUTPUT": "0",
    # Ray's TensorBoard logger warns on every infinite epsilon (the non-private baseline): keep only the CSV/JSON
    # result logs, which Ray's results read.
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    # Per-epoch checkpoints with num_to_keep=1 force a state snapshot on each report; intended (tiny state).
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}
"""Known noise of Ray Tune, switched off at its source (environment read when Ray is imported or a Tuner starts)."""
for _name, _value in QUIET_RAY_ENVIRONMENT.items():
    os.environ.setdefault(_name, _value)

QUIET_LOG_MESSAGES = {
    "ray._private.authentication.authentication_token_setup": (
        "Token authentication is enabled for this Ray",
        "Generated new authentication token",
    ),
    "mlflow.store.db.utils": ("Creating initial MLflow database tables", "Updating database tables"),
}
"""Exact log lines silenced (never whole loggers or levels): Ray's notice that a local cluster uses token auth (it
does, we keep it on), and MLflow's one-time table creation. (dp-accounting's one known line is silenced by
`trainables.privacy`, in every process that accounts.)"""


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


for _logger, _prefixes in QUIET_LOG_MESSAGES.items():
    logging.getLogger(_logger).addFilter(_DropMessages(_prefixes))
