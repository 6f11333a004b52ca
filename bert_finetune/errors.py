"""The one-line user error (and its kind for a failed write), the argument parser that raises it, and the wrapper every entry point runs under."""
import argparse
import functools
import logging
import sys


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2, no traceback."""


class WriteError(UserError):
    """A write that failed (disk full, quota, permissions, a file system gone): one line that names the path
    and the cause; what was written before stays as it was."""


EXIT_USER_ERROR = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are a UserError: one line, instead of usage + message + exit 2."""

    def error(self, message):
        raise UserError(message)


def cli(main):
    """Run `main` so that a UserError becomes `error: ...` on stderr and exit 2."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except UserError as e:
            logging.getLogger("bert_finetune").debug("user error", exc_info=True)
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper
