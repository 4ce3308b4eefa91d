"""The `crate` command: `crate train ...` (crate.train), `crate eval ...` (crate.evaluate) and
`crate audit ...` (crate.audit) and `crate verify ...` (crate.verify.command)."""

import sys

COMMANDS = {
    "train": "crate.train",
    "eval": "crate.evaluate",
    "audit": "crate.audit",
    "verify": "crate.verify.command",
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(
            f"usage: crate {{{','.join(COMMANDS)}}} [options]   (crate train --help for the options)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    from importlib import import_module

    import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    main()
