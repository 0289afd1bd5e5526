"""Helpers the dataset formats share, apart from the formats themselves (each format is one
module in passes/formats/, named by its settings model): folders.py (class-folder trees:
decoding, unreadable files, path resolution), csvio.py (streamed CSV reading and inference),
gtsrb_synth.py (Kiln's synthetic GTSRB tree), boxes.py (the detection formats' boxes, checks and
arrays), detection_synth.py (synthetic scenes with signs for them)."""
