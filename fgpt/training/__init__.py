"""The training loop and its components: run settings, the run directory, precision."""
