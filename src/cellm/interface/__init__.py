"""What users touch: the CLI, the Python API, run folders and their plots."""
