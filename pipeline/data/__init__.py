"""WebDataset shards of detection samples: manifest, readers, writer, synthetic set, augmentation, loader.

Only the manifest is imported here; the loader (which pulls in torch) and the writer are imported
from their modules, so that shard-writing processes start fast.
"""

from pipeline.data.manifest import DataError, Manifest, ShardInfo, read_manifest

__all__ = ["DataError", "Manifest", "ShardInfo", "read_manifest"]
