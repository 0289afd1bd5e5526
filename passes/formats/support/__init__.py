"""Helpers the dataset formats share, apart from the formats themselves (each format is one
module in passes/formats/, named by its settings model): folders.py (class-folder trees:
decoding, unreadable files, path resolution), csvio.py (streamed CSV reading and inference),
gtsrb_synth.py (Kiln's synthetic GTSRB tree)."""
