"""Datasets: the synthetic twin, real-dataset adapters, the preprocessing cache and loaders."""
