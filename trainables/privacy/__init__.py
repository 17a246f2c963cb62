"""DP-SGD: the Opacus engine with verified per-sample gradients, accounting, and the privacy ledger.

Importing the package silences one exact log line of dp-accounting (`DP_ACCOUNTING_NOTICE`), wherever our accounting
runs (the driver's planning and ledger, a trial's cross-check, the benchmarks): its series for the sampled Gaussian's
RDP at a fractional order (1.1-1.5, seen at q 0.04-0.08 and sigma 0.7-0.8) did not converge, so it returns an
infinite RDP at that order, which drops the order from the minimum over orders: the epsilon stays an upper bound (the
other orders'). A selection's dry run printed about 20 such lines and a short trial a dozen, none of them anything a
user could act on. No other line of the logger is touched.
"""

import logging

DP_ACCOUNTING_NOTICE = "_compute_log_a_frac failed to converge"
"""The start of the one dp-accounting log line silenced (package docstring)."""


class _DropNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(DP_ACCOUNTING_NOTICE)


logging.getLogger("absl").addFilter(_DropNotice())  # dp-accounting logs through absl's logger
