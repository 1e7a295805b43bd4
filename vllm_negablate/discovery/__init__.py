"""Discovery of Wasserstein neurons: streaming statistics and exact W1 scores."""
