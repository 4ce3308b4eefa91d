"""The `crate` command, kept outside the package so that `crate --help` and `crate --version` answer
without importing torch: each subcommand's module is imported only when it runs."""

import sys
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

COMMANDS = {
    "train": ("crate.train", "train or fine-tune CRATE, CRATE-α or any timm model"),
    "eval": ("crate.evaluate", "top-1, top-5, loss and images/s of trained weights on a dataset"),
    "audit": ("crate.audit", "the white-box audit: per-layer compression and sparsity, attention maps"),
    "verify": ("crate.verify.command", "check a model against the derived CRATE on a device and precision"),
    "export": ("crate.export", "write trained weights in a released key layout (CRATE or CRATE-α)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(
        [
            "usage: crate {" + ",".join(COMMANDS) + "} [options]",
            "       crate --version",
            "",
            "CRATE, the white-box transformer, verified against its derivation.",
            "",
            "commands:",
            *lines,
            "",
            "crate COMMAND --help lists a command's options.",
        ]
    )


def package_version() -> str:
    try:
        return version("crate-srr")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return
    if argv[:1] == ["--version"]:
        print(f"crate {package_version()}")
        return
    if not argv or argv[0] not in COMMANDS:
        wrong = f"unknown command {argv[0]!r}; " if argv else ""
        print(f"crate: error: {wrong}choose one of {', '.join(COMMANDS)} (crate --help)", file=sys.stderr)
        raise SystemExit(2)
    import_module(COMMANDS[argv[0]][0]).main(argv[1:])


if __name__ == "__main__":
    main()
