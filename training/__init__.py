"""Models and everything that changes their weights: bi-encoder, pooling, evaluation."""
