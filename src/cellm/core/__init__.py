"""Pure functions over flat tensors: the CELLM/FLASC algorithm with no I/O, no models and no runtime."""
