"""Running a registered model over many images on the Ray cluster: batch inference with Ray Data."""
