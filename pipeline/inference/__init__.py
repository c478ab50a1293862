"""Running a model over many images: a local folder in this process (``folder.py``), or at scale on the Ray
cluster with Ray Data (``batch.py``)."""
