"""The ``torchslim`` command-line interface."""
