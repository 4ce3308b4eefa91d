"""The `crate` command: `crate train ...` (crate.train) and `crate audit ...` (crate.audit)."""

import sys


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"train": "crate.train", "audit": "crate.audit"}
    if not argv or argv[0] not in commands:
        print("usage: crate {train,audit} [options]   (crate train --help for the options)", file=sys.stderr)
        raise SystemExit(2)
    from importlib import import_module

    import_module(commands[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    main()
