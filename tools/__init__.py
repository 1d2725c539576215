"""Data, metrics, logging and checkpoint helpers shared by the OASS scripts."""
