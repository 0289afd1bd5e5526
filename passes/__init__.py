"""Build passes: one pass per file, each with one entry point ``run``; order in pipeline.py."""
