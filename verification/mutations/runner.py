"""Every test can fail: break the implementation on purpose, once per mutation, and see which test
catches it.

    python -m verification.mutations          # all mutations (an hour or more on 2 cores)
    python -m verification.mutations -k ista  # those whose name contains "ista"
    python -m verification.mutations verification  # caught by verification/ alone?
    python -m verification.mutations -j 2 verification tests  # two at a time, both folders

Each mutation is applied to a copy of the tree in a temporary folder (this checkout is never
modified); the suites run there and stop at the first failure: the test files likeliest to catch a
mutation of its file first (its target's ``first`` in ``catalogue.py``, found by name anywhere under
each suite folder), then the rest, with the quick ``mutations`` hypothesis profile (ci's,
derandomized, with a twentieth of its examples, stopping at the first failure without shrinking it);
if nothing fails, the whole suites again with the ci profile. A mutation that no test catches is
reported as MISSED, one whose text is no longer in its file as STALE; the last lines give the score
(caught of all) and name every survivor, and either makes the exit status non-zero.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .catalogue import Mutation, Target, entries

ROOT = Path(__file__).resolve().parents[2]


MISSED = "MISSED"
STALE = "STALE"  # the text to replace is not in the file (once): the mutation needs updating


def _mutated(mutation: Mutation, source: str) -> str | None:
    olds, news = (
        (mutation.old, mutation.new) if isinstance(mutation.old, tuple) else ([mutation.old], [mutation.new])
    )
    for old, new in zip(olds, news, strict=True):
        if source.count(old) != 1:
            return None
        source = source.replace(old, new)
    return source


def _pytest(tree: Path, arguments: list[str], profile: str) -> str | None:
    """The first failing test of a pytest run in ``tree`` (it stops there), None if every test passes."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *arguments],
        cwd=tree,
        env=dict(os.environ, CI="1", HYPOTHESIS_PROFILE=profile, PYTHONPATH=str(tree)),
        capture_output=True,
        text=True,
    )
    if result.returncode == 0:
        return None
    failed = [line.split(" ")[1] for line in result.stdout.splitlines() if line.startswith("FAILED ")]
    lines = (result.stdout.strip() or result.stderr.strip() or "no output").splitlines()
    return failed[0] if failed else lines[-1]


def run(target: Target, mutation: Mutation, suites: list[str]) -> str:
    """'caught by <test>', MISSED or STALE. First the target's first test files (by name, anywhere under
    each suite folder), then the rest of the suites, with the quick ``mutations`` hypothesis profile; if
    nothing failed, the whole suites with the ci profile, so that a survivor has passed what CI runs."""
    with tempfile.TemporaryDirectory() as folder:
        tree = Path(folder) / "tree"
        shutil.copytree(
            ROOT, tree, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", ".hypothesis")
        )
        path = tree / target.path
        source = _mutated(mutation, path.read_text())
        if source is None:
            return STALE
        path.write_text(source)
        first = [
            str(found.relative_to(tree))
            for suite in suites
            for name in target.first
            for found in sorted((tree / suite).rglob(name))
            if found.is_file()
        ]
        failed = _pytest(tree, first, "mutations") if first else None
        if failed is None:
            failed = _pytest(tree, [*suites, *(f"--ignore={path}" for path in first)], "mutations")
        if failed is None:
            failed = _pytest(tree, suites, "ci")
    return MISSED if failed is None else f"caught by {failed}"


def main() -> None:
    parser = argparse.ArgumentParser(description="Break the implementation on purpose; check a test fails.")
    parser.add_argument("-k", default="", help="only the mutations whose name contains this text")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="mutations run at once")
    parser.add_argument("suites", nargs="*", default=["tests", "verification"], help="test folders to run")
    args = parser.parse_args()
    chosen = [(target, mutation) for target, mutation in entries() if args.k.lower() in mutation.name.lower()]

    def timed(entry: tuple[Target, Mutation]) -> str:
        target, mutation = entry
        start = time.monotonic()
        outcome = run(target, mutation, args.suites)
        print(f"{mutation.name:60s} {outcome} ({time.monotonic() - start:.0f} s)", flush=True)
        return outcome

    with ThreadPoolExecutor(args.jobs) as pool:
        outcomes = dict(zip([m.name for _, m in chosen], pool.map(timed, chosen), strict=True))
    caught = sum(outcome.startswith("caught") for outcome in outcomes.values())
    print(f"\nscore: {caught} of {len(outcomes)} mutations caught by {' + '.join(args.suites)}")
    for kind in (MISSED, STALE):
        names = [name for name, outcome in outcomes.items() if outcome == kind]
        print(f"{kind.lower()} ({len(names)}): {', '.join(names) if names else 'none'}")
    sys.exit(1 if caught < len(outcomes) else 0)
