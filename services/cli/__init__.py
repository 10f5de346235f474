"""The ``hivemesh`` command line."""
