"""User-facing errors: raised for bad input, printed by the CLI as one line."""


class UserError(Exception):
    """Bad input (a missing file, wrong columns, an unknown backend, ...).

    The command-line entry point prints ``error: <message>`` on one line and
    exits with status 2 instead of a traceback.
    """


def check_ranges(group: str, options: object, checks: dict[str, tuple[bool, str]]) -> None:
    """Refuse the first of an option group's values out of range: ``checks`` maps a field of ``options`` to
    (whether its value is fine, what it must be), e.g. ``model.lora.r must be a positive integer, not 0``."""
    for name, (ok, what) in checks.items():
        if not ok:
            value = getattr(options, name)
            shown = list(value) if isinstance(value, tuple) else value
            raise UserError(f"{group}.{name} must be {what}, not {shown!r}")
