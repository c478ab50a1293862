"""Hyperparameter search: Ray Tune over training trials, their table, and the PGI study report."""
