"""What a user can get wrong, and how every `crate` subcommand says so: one line naming what was
wrong and what was expected, the README's exit code (2), no traceback. A traceback (exit 1) means a
bug in this code, never a bad input."""

import argparse
import functools
import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2


class UserError(Exception):
    """An input a command cannot use (an option, a file, a folder, a dataset, a checkpoint); the
    message names it and what was expected."""

    exit_code = EXIT_USER_ERROR


class MissingError(UserError, FileNotFoundError):
    """A file, folder or dataset that is not where the user pointed; the message says where it looked."""


class InvalidError(UserError, ValueError):
    """An input that is there but cannot be used (an unknown name, a corrupt file, weights of another
    shape); the message says what was expected."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors: one line, without the usage (`--help` prints it)."""

    def error(self, message: str):
        raise UserError(message)


def command(prog: str) -> Callable:
    """Wrap a command's ``main(argv)``: a UserError becomes ``PROG: error: ...`` on stderr and its
    exit code."""

    def wrap(main: Callable) -> Callable:
        @functools.wraps(main)
        def run(argv: list[str] | None = None):
            try:
                return main(argv)
            except UserError as error:
                print(f"{prog}: error: {error}", file=sys.stderr)
                raise SystemExit(error.exit_code) from None

        return run

    return wrap
