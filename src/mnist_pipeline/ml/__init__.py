"""The machine learning: data, model, training, evaluation, export, distributed training. No MLflow here."""
