"""The foundation every package sits on: the error tree, secret handling, logging, resource names.

Nothing here imports another enclave-serve package; ``attest``, ``loader``, ``server`` and
``runtime`` all import from here (an import contract in ``pyproject.toml`` says so).
"""
