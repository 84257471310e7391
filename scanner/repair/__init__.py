"""Repair: choose channels to prune, refit the head, verify and write the result."""
