"""The ``crd-fast`` command line."""
