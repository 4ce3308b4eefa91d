"""benchmarks.history on made-up runs: a ratio that falls by more than its run-to-run spread is a
regression, one within it is not; other machine kinds and smoke runs are not history."""

import json
from pathlib import Path

import pytest

from benchmarks import history
from benchmarks.conftest import COMMIT_VARIABLE, pytest_benchmark_update_commit_info

CPU = dict(brand_raw="Test CPU", count=2, flags=["avx2"])
OTHER_CPU = dict(brand_raw="Test CPU", count=2, flags=["avx2", "avx512_bf16"])
KIND = "Test CPU, 2 cores, avx2"


def write_run(folder: Path, index: int, fast_over_naive: float, cpu=CPU, batch: int = 8) -> None:
    """One stored run: CRATE-T training, fast/naive ``fast_over_naive`` (per-round range ±0.01)."""
    spread = dict(median=fast_over_naive, min=fast_over_naive - 0.01, max=fast_over_naive + 0.01)
    models = [
        dict(family="crate", kind=kind, images_per_s=dict(median=10.0, min=9.0, max=11.0))
        for kind in ("fast", "naive")
    ]
    info = dict(
        size="tiny",
        mode="train",
        batch=batch,
        device="CPU (2 threads)",
        models=models,
        ratios=[dict(spread, family="crate", fast_over="naive")],
    )
    data = dict(
        machine_info=dict(cpu=cpu),
        commit_info=dict(id=f"{index:040x}"),
        datetime=f"2026-11-{index + 1:02d}T00:00:00",
        benchmarks=[dict(extra_info=info)],
    )
    (folder / f"{index:04d}.json").write_text(json.dumps(data))


def verdict(folder: Path) -> history.Verdict:
    _, _, verdicts = history.compare(history.load_runs([folder]), KIND)
    (only,) = verdicts
    return only


def test_a_fall_beyond_the_spread_of_the_history_is_a_regression(tmp_path):
    for index, ratio in enumerate([1.50, 1.40, 1.45, 1.20]):  # history spread 0.10, median 1.45
        write_run(tmp_path, index, ratio)
    result = verdict(tmp_path)
    assert (result.reference, result.spread_from) == (1.45, "history")
    assert result.spread == pytest.approx(0.10)
    assert result.regressed
    with pytest.raises(SystemExit, match=r"1 ratio\(s\) regressed: tiny train CRATE fast/naive"):
        history.main([str(tmp_path), "--kind", KIND])


def test_a_fall_within_the_spread_is_not(tmp_path):
    for index, ratio in enumerate([1.50, 1.40, 1.45, 1.36]):
        write_run(tmp_path, index, ratio)
    assert not verdict(tmp_path).regressed
    history.main([str(tmp_path), "--kind", KIND])  # no SystemExit


def test_with_one_earlier_run_the_spread_is_the_newest_runs_own(tmp_path):
    write_run(tmp_path, 0, 1.50)
    write_run(tmp_path, 1, 1.48)
    result = verdict(tmp_path)
    assert result.spread_from == "this run" and result.spread == pytest.approx(0.01)
    assert result.regressed  # 0.02 below, more than the run's own 0.01


def test_other_machine_kinds_and_smoke_runs_are_not_history(tmp_path):
    write_run(tmp_path, 0, 1.50)
    write_run(tmp_path, 1, 0.50, cpu=OTHER_CPU)  # another kind: much slower, but not this history
    write_run(tmp_path, 2, 0.50, batch=2)  # a --bench-smoke run
    write_run(tmp_path, 3, 1.49)
    runs = history.load_runs([tmp_path])
    assert [run.kind for run in runs] == [KIND, "Test CPU, 2 cores, avx512_bf16", KIND]
    result = verdict(tmp_path)
    assert result.reference == 1.50 and not result.regressed


def test_a_run_stored_twice_counts_once(tmp_path):
    """`make bench` writes each run twice (pytest-benchmark's storage and --benchmark-json), their
    datetimes a few milliseconds apart: the newest run must not be its own history."""
    write_run(tmp_path, 0, 1.50)
    write_run(tmp_path, 1, 1.20)
    copy = json.loads((tmp_path / "0001.json").read_text())
    copy["datetime"] = copy["datetime"] + ".005"
    (tmp_path / "copy.json").write_text(json.dumps(copy))
    assert len(history.load_runs([tmp_path])) == 2
    assert verdict(tmp_path).regressed


def test_history_plot_and_unknown_kind(tmp_path):
    for index, ratio in enumerate([1.5, 1.4, 1.45]):
        write_run(tmp_path, index, ratio)
    png = tmp_path / "history.png"
    history.main([str(tmp_path), "--kind", KIND, "--plot", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="no stored benchmark run of 'Another CPU'.*stored kinds: " + KIND):
        history.main([str(tmp_path), "--kind", "Another CPU"])


def test_the_stored_runs_of_this_repository_are_readable_and_drawn(tmp_path):
    """The committed runs, whose newest has more models (12: three modes) than a 10-colour palette."""
    runs = history.load_runs()
    assert runs, "benchmarks/results/ holds the runs committed so far"
    assert all(run.ratios for run in runs)
    png = history.plot(runs, runs[-1].kind, tmp_path / "history.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compiled_ratios_and_throughputs_are_their_own_series(tmp_path):
    """A run with compiled rows: compiled/eager and compiled/ViT compiled apart from fast/ViT, and the
    compiled models' images/s (ViT's too) apart from the eager ones'."""
    spread = dict(median=1.5, min=1.4, max=1.6)
    images = dict(median=10.0, min=9.0, max=11.0)
    models = [
        dict(family=family, kind=kind, images_per_s=images)
        for family in ("crate", "vit")
        for kind in ("fast", "compiled")
    ]
    ratios = [dict(spread, family="crate", fast_over="vit")] + [
        dict(spread, family="crate", kind="compiled", fast_over=other) for other in ("eager", "vit")
    ]
    info = dict(size="tiny", mode="train", batch=256, device="GPU", models=models, ratios=ratios)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(dict(benchmarks=[dict(extra_info=info)], commit_info=dict(id="c" * 40))))
    run = history.read_run(path)
    assert set(run.ratios) == {
        "tiny train CRATE fast/ViT",
        "tiny train CRATE compiled/eager",
        "tiny train CRATE compiled/ViT compiled",
    }
    assert set(run.images_per_s) == {
        "tiny train CRATE",
        "tiny train CRATE compiled",
        "tiny train ViT compiled",
    }


@pytest.mark.parametrize(
    ("found", "named", "stored"),
    [
        ("unversioned", "abc1234", "abc1234"),  # no .git (a GPU machine's copy): the named commit
        ("unknown", "abc1234", "abc1234"),  # git failed
        ("f00d", "abc1234", "f00d"),  # git found one: kept
        ("unversioned", None, "unversioned"),  # nothing named
    ],
)
def test_a_run_without_git_is_filed_under_the_named_commit(monkeypatch, found, named, stored):
    if named is None:
        monkeypatch.delenv(COMMIT_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(COMMIT_VARIABLE, named)
    commit_info = dict(id=found, dirty=False)
    pytest_benchmark_update_commit_info(None, commit_info)
    assert commit_info["id"] == stored
