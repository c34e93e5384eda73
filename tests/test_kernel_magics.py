"""``%runbook`` on real kernels: usage errors, bad notebooks, parameters, decisions, unload."""

from __future__ import annotations

from pathlib import Path

from helpers.kernels import (  # noqa: F401 - fixtures
    Kernels,
    check_instance,
    effects,
    kernels_fixture,
    notebook_copy_fixture,
    start_code,
)
from nbrunbook.engine.factory import open_store


def _usage(result: object) -> str:
    assert getattr(result, "ename", None) == "UsageError", getattr(result, "error_text", result)
    return str(getattr(result, "evalue", ""))


def test_bad_usage_is_a_usage_error(kernels: Kernels, notebook_copy, tmp_path: Path) -> None:
    nb = notebook_copy("effects.ipynb")
    k = kernels.start()
    k.execute("%load_ext nbrunbook").ok()
    assert "needs a command: start, attach, status" in _usage(k.execute("%runbook"))
    assert "invalid choice: 'frobnicate'" in _usage(k.execute("%runbook frobnicate"))
    assert "one of the arguments --rerun --done --skip is required" in _usage(k.execute("%runbook resolve c1"))
    assert "expected 2 arguments" in _usage(k.execute("%runbook start -p onlyname"))
    assert "no runbook instance is attached" in _usage(k.execute("%runbook status"))
    assert "no runbook instance is attached" in _usage(k.execute("%runbook rerun"))
    assert "cannot tell which notebook" in _usage(k.execute("%runbook start"))
    assert "JPY_SESSION_NAME is not set" in _usage(k.execute("%runbook start"))
    assert "no such file" in _usage(k.execute("%runbook start --notebook missing.ipynb"))
    bad_id = _usage(k.execute(f"%runbook start --notebook {nb.path} --instance 'bad id!'"))
    assert "invalid instance id 'bad id!'" in bad_id
    assert "not a valid parameter name" in _usage(k.execute(f"%runbook start --notebook {nb.path} -p 1x 2"))
    assert "no instance 'nope'" in _usage(k.execute("%runbook attach nope"))
    k.execute(start_code(nb.path, tmp_path / "store.duckdb")).ok()
    assert "-n must be at least 1" in _usage(k.execute("%runbook journal -n 0"))
    assert "no cell 'nosuch'" in _usage(k.execute("%runbook rerun nosuch"))
    assert "has no record" in _usage(k.execute("%runbook rerun a"))  # never ran
    assert "has no record" in _usage(k.execute("%runbook resolve a --done"))
    assert "%runbook COMMAND" in k.value("get_ipython().find_line_magic('runbook').__doc__")


def test_bad_notebooks_are_refused_by_name(kernels: Kernels, notebook_copy, tmp_path: Path) -> None:
    dup = notebook_copy("dup_ids.ipynb")
    k = kernels.start()
    k.execute("%load_ext nbrunbook").ok()
    msg = _usage(k.execute(f"%runbook start --notebook {dup.path} --store {tmp_path / 's.duckdb'}"))
    assert "duplicate cell ids in the notebook: other, same" in msg
    (tmp_path / "junk.ipynb").write_text("{not json")
    assert "is not a notebook" in _usage(k.execute(f"%runbook start --notebook {tmp_path / 'junk.ipynb'}"))
    assert not (tmp_path / "s.duckdb").exists()  # refused before the store was touched
    assert "no runbook instance is attached" in _usage(k.execute("%runbook status"))


def test_notebook_found_from_the_session(kernels: Kernels, notebook_copy, tmp_path: Path) -> None:
    notebook_copy("effects.ipynb")
    # (no $NBRUNBOOK_STORE, so the store goes beside the notebook)
    k = kernels.start(JPY_SESSION_NAME=str(Path("some/server/root") / "effects.ipynb"), NBRUNBOOK_STORE="")
    out = k.execute("%load_ext nbrunbook\n%runbook start --instance S1").ok().stdout
    assert "started instance S1 of runbook 'effects'" in out
    assert str(tmp_path / ".nbrunbook" / "store.duckdb") in out  # default store beside the notebook
    k.execute("%runbook stop").ok()
    # VS Code's variable is the other source.
    k2 = kernels.start()
    k2.execute(f"__vsc_ipynb_file__ = {str(tmp_path / 'effects.ipynb')!r}").ok()
    out = k2.execute(f"%load_ext nbrunbook\n%runbook start --instance S2 --store {tmp_path / 'v.duckdb'}").ok().stdout
    assert "started instance S2 of runbook 'effects'" in out


def test_parameters_are_fixed_per_instance(kernels: Kernels, notebook_copy, tmp_path: Path) -> None:
    nb = notebook_copy("effects.ipynb")
    store = tmp_path / "store.duckdb"
    k = kernels.start()
    out = k.execute(start_code(nb.path, store, extra="-p n 5 -p ratio 0.5 -p flag True -p name eu-1")).ok().stdout
    assert "params flag=True, n=5, name='eu-1', ratio=0.5" in out
    assert k.value("[n, ratio, flag, name]") == [5, 0.5, True, "eu-1"]
    msg = _usage(k.execute(start_code(nb.path, store, extra="-p n 6 -p ratio 0.5 -p flag True -p name eu-1")))
    assert "instance 'T1' was created with other parameters (differing: n)" in msg
    out = k.execute(start_code(nb.path, store)).ok().stdout  # no -p: resume with the stored ones
    assert "resumed instance T1" in out and "n=5" in out
    out = k.execute(start_code(nb.path, store, extra="-p n 6 --force-params")).ok().stdout
    assert "params n=6" in out
    k.restart()
    out = k.execute(f"%load_ext nbrunbook\n%runbook attach T1 --store {store} --notebook {nb.path}").ok().stdout
    assert "attached instance T1" in out and "n=6" in out
    assert k.value("n") == 6
    k.execute("%runbook stop").ok()
    events = check_instance(store, "T1")
    assert [e.event for e in events if e.event in ("instance_created", "params_forced")] == [
        "instance_created",
        "params_forced",
    ]


def test_status_journal_instances_rerun_resolve(kernels: Kernels, notebook_copy, tmp_path: Path) -> None:
    nb = notebook_copy("effects.ipynb")
    store = tmp_path / "store.duckdb"
    k = kernels.start()
    k.execute(start_code(nb.path, store)).ok()
    nb.run(k)  # stops at c
    status = k.execute("%runbook status").ok().stdout
    assert "instance T1 · runbook 'effects' (manifest v1) · failed · 2/5 done" in status
    assert "✓ done" in status and "✗ failed" in status and "[c]" in status
    journal = k.execute("%runbook journal -n 3").ok().stdout.splitlines()
    assert len(journal) == 3 and "failed" in journal[-1] and "cell/c@1" in journal[-1]
    assert "T1" in k.execute("%runbook instances").ok().stdout
    # A person decides: skip the failed cell; it is not run and counts as finished.
    k.execute("%runbook resolve c --skip --note 'done by hand'").ok()
    skipped = k.execute(nb.source("c"), cell_id="c").ok()
    assert "skipped by decision" in skipped.status_lines[0] and skipped.stdout == ""
    assert k.execute(nb.source("d"), cell_id="d").ok().result == {"text/plain": "84"}
    # rerun without a cell: the last guarded cell this kernel ran.
    assert "reopened as cell/d@2" in k.execute("%runbook rerun").ok().stdout
    k.execute(nb.source("d"), cell_id="d").ok()
    assert "reopened as cell/a@2" in k.execute("%runbook rerun 'effect(\"a\")'").ok().stdout  # by name
    assert "instance T1 · runbook 'effects'" in k.execute("%runbook dashboard --text").ok().stdout
    k.execute("%runbook stop").ok()
    assert "no runbook instance is attached" in _usage(k.execute("%runbook status"))
    lines = effects(tmp_path)
    assert [e["step_key"] for e in lines] == ["cell/a@1", "cell/b@1", "cell/c@1", "cell/d@1", "cell/d@2"]
    check_instance(store, "T1", lines)


def test_attempts_are_bounded(kernels: Kernels, notebook_copy, tmp_path: Path) -> None:
    nb = notebook_copy("effects.ipynb")
    k = kernels.start()
    k.execute("%load_ext nbrunbook\n%config RunbookMagics.max_attempts = 2").ok()
    k.execute(start_code(nb.path, tmp_path / "store.duckdb", extra="--unordered")).ok()
    for _ in range(2):
        assert k.execute("raise ValueError('nope')", cell_id="boom").ename == "ValueError"
    exhausted = k.execute("raise ValueError('nope')", cell_id="boom")
    assert exhausted.ename == "AttemptsExhausted" and "failed 2 times (limit 2)" in exhausted.evalue
    k.execute("%runbook resolve boom --rerun").ok()
    assert k.execute("print('fixed')", cell_id="boom").ok().stdout == "fixed\n"


def test_unload_removes_every_hook(kernels: Kernels, notebook_copy, tmp_path: Path) -> None:
    nb = notebook_copy("effects.ipynb")
    store = tmp_path / "store.duckdb"
    k = kernels.start()
    ours = (
        "[sum('nbrunbook' in getattr(getattr(f, '__func__', f), '__module__', '') for f in ip.events.callbacks[e])"
        " for e in ('pre_run_cell', 'post_run_cell')]"
        " + [sum('nbrunbook' in type(t).__module__ for t in ip.ast_transformers),"
        " sum('nbrunbook' in type(c).__module__ for c in ip.configurables),"
        " int('runbook' in ip.magics_manager.magics['line'])]"
    )
    totals = "[len(ip.events.callbacks[e]) for e in ('pre_run_cell', 'post_run_cell')] + [len(ip.ast_transformers)]"
    k.execute("ip = get_ipython()").ok()
    before = k.value(ours), k.value(totals)
    assert before[0] == [0, 0, 0, 0, 0]
    k.execute(start_code(nb.path, store)).ok()
    assert k.value(ours) == [1, 1, 1, 1, 1]
    nb.run(k, ["setup", "a"])
    k.execute("%unload_ext nbrunbook").ok()
    assert (k.value(ours), k.value(totals)) == before
    assert "not found" in k.execute("%runbook status").evalue
    assert k.execute("print('plain')", cell_id="after").ok().stdout == "plain\n"
    # Unloading detached the instance and released the store: it opens here right away.
    with open_store(store) as s:
        assert s.step("T1", "cell/a").status == "done"  # type: ignore[union-attr]
        assert {st.path for st in s.steps("T1")} == {"cell/a"}  # nothing claimed after unload
    k.execute(start_code(nb.path, store)).ok()  # loads again
    assert k.execute(nb.source("a"), cell_id="a").ok().status_lines
