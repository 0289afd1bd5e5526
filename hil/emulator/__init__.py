"""Boards emulated on this machine."""
