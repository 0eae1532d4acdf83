"""The command modules of the ``thyrocad`` CLI, one per concern."""
