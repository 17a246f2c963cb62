"""Trial tables, Pareto fronts, the study's tables and figures. Never imports torch."""
