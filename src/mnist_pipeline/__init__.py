"""mnist-pipeline: a reproducible MNIST training pipeline (PyTorch, DVC, MLflow)."""
