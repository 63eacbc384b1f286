"""What `mnist-pipeline` runs besides the pipeline: predict, serve, ui, compare, reproduce, tune."""
