"""The model registry: verify, export and register a model, and the served (pyfunc) model."""
