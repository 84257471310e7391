"""Data: image sets, preprocessing, triggers and probes."""
