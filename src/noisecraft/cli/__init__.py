"""The `noisecraft` command line."""
