"""One store, every spelling (issue 24 E): relative, absolute, symlinked, prefixed, from the environment.

Real ``nbrunbook run`` subprocesses on one DuckDB file. The oracle is the
effects file the cells append to (one line per executed step, with its step
key and idempotency key) and the store's journal: however a run names the
store, it finds the steps the others recorded, and no step runs twice - not
even when an in-process (``embedded:``) run and a store-server run of one
instance race on one file.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from helpers.runbooks import cli, effect_cell, start_cli, write_notebook
from nbrunbook.engine.factory import canonical_location, open_store, split_location
from nbrunbook.engine.launch import stop_server

STEPS = ["one", "two", "three", "four"]


def _notebook(tmp: Path, effects: Path, pause: float = 0.0) -> Path:
    cells = [("setup", f"import json, time\nEFFECTS = {str(effects)!r}", [])]
    cells += [(name, effect_cell(f"time.sleep({pause})\n"), []) for name in STEPS]
    return write_notebook(tmp / "rb.ipynb", cells)


def _effects(effects: Path) -> Counter[str]:
    if not effects.exists():
        return Counter()
    return Counter(json.loads(line)["step_key"] for line in effects.read_text().splitlines())


def _done_steps(store: Path, instance: str) -> dict[str, str]:
    stop_server(store)  # it holds the file until idle; read it in this process
    st = open_store(f"embedded:{store}")
    try:
        return {s.path: s.status for s in st.steps(instance)}
    finally:
        st.close()


def test_every_spelling_of_a_path_is_one_canonical_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = tmp_path / "data" / "store.duckdb"
    real.parent.mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    plain = str(real.resolve())
    for spec in ("data/store.duckdb", plain, "link/store.duckdb", "./link/../data/store.duckdb", f"server:{plain}"):
        assert split_location(spec) == ("server", plain), spec
        assert canonical_location(spec) == plain, spec
    prefixed = (
        "embedded:data/store.duckdb",
        f"duckdb:{plain}",
        "embedded:link/store.duckdb",
        "DUCKDB:link/x/../store.duckdb",
    )
    for spec in prefixed:
        assert canonical_location(spec) == f"embedded:{plain}", spec
    monkeypatch.setenv("NBRUNBOOK_STORE", "duckdb:link/store.duckdb")
    assert canonical_location(None) == f"embedded:{plain}"


def test_runs_spelling_one_store_differently_share_it(tmp_path: Path) -> None:
    effects = tmp_path / "effects.jsonl"
    nb = _notebook(tmp_path, effects)
    store = tmp_path / "data" / "store.duckdb"
    (tmp_path / "link").symlink_to(tmp_path / "data", target_is_directory=True)
    first = cli("run", str(nb), "-i", "same", "--store", "embedded:data/store.duckdb", "--no-progress", cwd=tmp_path)
    assert first.code == 0, first.stderr
    assert "ran 4, skipped 0" in first.stderr
    # In-process spellings first: a store server, once started, holds the file until it idles out.
    spellings: list[tuple[list[str], dict[str, str]]] = [
        (["--store", f"duckdb:{tmp_path / 'link' / 'store.duckdb'}"], {}),  # prefixed, symlinked, absolute
        ([], {"NBRUNBOOK_STORE": "embedded:link/../data/store.duckdb"}),  # the environment, prefixed
        (["--store", str(store)], {}),  # absolute, through the store server
        (["--store", "server:link/store.duckdb"], {}),  # prefixed and symlinked, relative
        ([], {"NBRUNBOOK_STORE": "link/store.duckdb"}),
    ]
    for args, env in spellings:
        again = cli("run", str(nb), "-i", "same", *args, "--no-progress", cwd=tmp_path, env=env)
        assert again.code == 0, (args, env, again.stderr)
        assert "ran 0, skipped 4 of 5 cells" in again.stderr, (args, env, again.stderr)
        assert f"output {tmp_path / 'data' / 'out'}" in again.stderr  # beside the one store file
    assert set(_effects(effects).values()) == {1} and len(_effects(effects)) == len(STEPS)
    # While the store server holds the file, an in-process spelling is refused, and told why and what to do.
    assert cli("server", "start", "--store", "link/store.duckdb", cwd=tmp_path).code == 0
    held = cli("run", str(nb), "-i", "same", "--store", "embedded:data/store.duckdb", "--no-progress", cwd=tmp_path)
    assert held.code == 4, held.stderr
    assert held.lines == [held.lines[0]] and "the store server of this file" in held.lines[0], held.stderr
    assert f"nbrunbook server stop --store {store}" in held.lines[0]
    stop_server(store)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "effects.jsonl", "link", "rb.ipynb"]


@pytest.mark.parametrize("spec", ["s3://bucket/store.duckdb", "postgres://host/db", "sqlite:store.db", "embedded:"])
def test_a_store_spec_naming_no_store_is_refused(tmp_path: Path, spec: str) -> None:
    effects = tmp_path / "effects.jsonl"
    nb = _notebook(tmp_path, effects)
    before = sorted(p.name for p in tmp_path.iterdir())
    run = cli("run", str(nb), "-i", "x", "--store", spec, "--no-progress", cwd=tmp_path)
    assert run.code == 2, run.stderr
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"nbrunbook: error: store {spec!r}: "), run.stderr
    assert ("unknown store scheme" in lines[0]) or ("no file named" in lines[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no "s3:" directory, no store, no output


@pytest.mark.parametrize(
    "pair",
    [
        ("embedded:{store}", "{store}"),
        ("server:{link}", "duckdb:{store}"),
        ("{link}", "embedded:{link}"),
    ],
    ids=["embedded-vs-plain", "server-vs-duckdb", "symlink-plain-vs-symlink-embedded"],
)
def test_embedded_and_server_racing_on_one_file_never_both_run_a_step(tmp_path: Path, pair: tuple[str, str]) -> None:
    effects = tmp_path / "effects.jsonl"
    nb = _notebook(tmp_path, effects, pause=0.2)
    store = tmp_path / "data" / "store.duckdb"
    store.parent.mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data", target_is_directory=True)
    names = {"store": str(store), "link": str(tmp_path / "link" / "store.duckdb")}
    procs = [
        start_cli("run", str(nb), "-i", "race", "--store", spec.format(**names), "--no-progress", cwd=tmp_path)
        for spec in pair
    ]
    results = [(p.wait(timeout=600), p.communicate()[1]) for p in procs]
    for code, stderr in results:
        # Either run advances the instance, or it is refused for the store the other holds (exit 4).
        assert code in (0, 4), stderr
        if code == 4:
            lines = [ln for ln in stderr.splitlines() if ln.startswith("nbrunbook")]
            assert lines == [lines[0]] and "held by another process" in lines[0], stderr
    ran = _effects(effects)
    assert all(n == 1 for n in ran.values()), ran  # never both
    # Whatever the race left, a later run (either spelling) finishes the instance without repeating a step;
    # a store server the race started holds the file until it idles out, so stop it first.
    stop_server(store)
    final = cli("run", str(nb), "-i", "race", "--store", pair[1].format(**names), "--no-progress", cwd=tmp_path)
    assert final.code == 0, final.stderr
    ran = _effects(effects)
    assert sorted(ran) == sorted(f"cell/{s}@1" for s in STEPS) and set(ran.values()) == {1}, ran
    assert set(_done_steps(store, "race").values()) == {"done"}
    assert os.listdir(tmp_path / "link") == os.listdir(store.parent)
