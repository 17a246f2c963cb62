"""DP-SGD: the Opacus engine with verified per-sample gradients, accounting, and the privacy ledger."""
