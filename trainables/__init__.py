"""Everything one DP training trial needs. Never imports `sweeps` or `analysis`."""
