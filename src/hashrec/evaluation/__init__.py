"""Layer 6: metrics, baselines, experiments (train + baselines + evaluation) and their reports."""
