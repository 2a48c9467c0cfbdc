"""Training: the loop, its objective, metrics, plots and progress display."""
