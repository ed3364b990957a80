"""Subcommands of the ``popalign`` console script; see :mod:`popalign.cli` for the contract."""
