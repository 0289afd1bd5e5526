"""Helpers the front ends share, apart from the front ends themselves (each is one module in
passes/frontends/, named by its settings model): spectral.py (framing, windows, mel filters and
the DCT that logmel and mfcc build on)."""
