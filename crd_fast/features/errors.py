"""The feature package's error type, in its own module so backbone.py and hed.py can both raise it."""


class BackboneWeightsError(RuntimeError):
    """Backbone weights could not be obtained or do not fit the architecture (the message says what to do)."""
