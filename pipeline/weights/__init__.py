"""Starting weights: reference files and checkpoints read, transferred and traced to their source."""
