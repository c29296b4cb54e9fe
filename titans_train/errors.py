"""The one hierarchy of user-facing errors: a user error is not an assertion failure.

`UserError` is anything the person running a command can fix (a config value, a file, a launch
environment). The CLI catches it at the top, prints its message on one line and exits 2. Every
subclass's message names what is wrong and the fix; `ConfigError` also names the config key.
Code bugs stay ordinary exceptions (RuntimeError, TypeError) with a traceback.
"""

from __future__ import annotations

# Exit codes: the contract between the CLI and whatever launched it (SLURM scripts requeue on 75).
EXIT_OK = 0
EXIT_USER_ERROR = 2  # a UserError: nothing (more) started; fix the input, do not retry as is
EXIT_DIVERGED = 3  # the loss became NaN/inf: stopped without saving (the last checkpoint is sane)
EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped by a signal after a complete checkpoint; requeue me
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command ended by Ctrl-C


class UserError(Exception):
    """A problem the user can fix; its message says what and how."""


class ConfigError(UserError, ValueError):
    """A config value (or combination) that cannot run. `key` is the dotted path at fault,
    `reason` the message without it."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.reason = message
        super().__init__(f"{key}: {message}")
