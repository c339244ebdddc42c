"""cellm."""
