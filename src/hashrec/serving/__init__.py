"""Layer 7: serving: the recommendation pipeline (retrieve -> rank -> score)."""
