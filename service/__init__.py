"""The HTTP service and the `lockstep` command line."""
