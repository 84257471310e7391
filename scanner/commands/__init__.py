"""One module per command: each composes the stages into the pipeline the command runs."""
