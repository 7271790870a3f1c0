"""What a job costs and how fast creates go: prices, budget, pacing, limits."""
