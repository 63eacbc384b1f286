"""MLflow: where the store is, the pipeline's run, the registry, loading a model, repairing what killed runs left."""
