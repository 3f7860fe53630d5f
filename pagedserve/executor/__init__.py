"""How it runs: flat step inputs, models, attention backends, kernels, sampling. Uses torch."""
