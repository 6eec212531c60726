"""Layer 4: models built from the neural pieces (the Phoenix ranker), losses, the scorer."""
