"""User-facing errors: raised for bad input, printed by the CLI as one line."""


class UserError(Exception):
    """Bad input (a missing file, wrong columns, an unknown backend, ...).

    The command-line entry point prints ``error: <message>`` on one line and
    exits with status 2 instead of a traceback.
    """
