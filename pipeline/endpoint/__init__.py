"""The registered model answering HTTP requests on the Ray cluster (Ray Serve): requests batched,
replicas autoscaled, an alias followed."""
