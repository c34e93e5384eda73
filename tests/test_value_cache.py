"""The recorded-values cache: bounded, never partial, and transparent to the store's answers."""

from __future__ import annotations

from pathlib import Path

from conftest import owner
from nbrunbook.engine.embedded import EmbeddedStore
from nbrunbook.engine.model import EncodedValue
from nbrunbook.engine.valuecache import ValueCache

A = owner("alice")


def _v(n: int) -> dict[str, EncodedValue]:
    return {"x": EncodedValue("json", b"7" * n)}


def test_lru_is_bounded_in_bytes() -> None:
    cache = ValueCache(max_bytes=250, max_entry=200)
    cache.put("i", "cell/a@1", _v(100))
    cache.put("i", "cell/b@1", _v(100))
    assert cache.get("i", "cell/a@1") == _v(100)  # a is now the most recent
    cache.put("i", "cell/c@1", _v(100))  # over budget: b, the least recent, goes
    assert cache.get("i", "cell/b@1") is None
    assert cache.get("i", "cell/a@1") == _v(100)
    assert cache.get("i", "cell/c@1") == _v(100)


def test_empty_and_oversized_values_are_not_cached() -> None:
    cache = ValueCache(max_bytes=1000, max_entry=50)
    cache.put("i", "cell/a@1", {})
    cache.put("i", "cell/b@1", _v(100))
    assert cache.get("i", "cell/a@1") is None
    assert cache.get("i", "cell/b@1") is None


def test_cached_answers_equal_the_files(tmp_path: Path) -> None:
    path = str(tmp_path / "s.duckdb")
    store = EmbeddedStore(path)
    store.open_instance("rb", "i", {}, manifest_version=0, owner=A, run_id="r")
    c = store.claim("i", "cell/a", owner=A, run_id="r")
    assert store.values("i", c.step_key) == {}  # not done yet: nothing cached ...
    vals = {"x": EncodedValue("json", b"[1]"), "y": EncodedValue("arrow", bytes(range(64)))}
    store.complete("i", c.step_key, owner=A, epoch=c.state.epoch, run_id="r", values=vals)
    assert store.values("i", c.step_key) == vals  # ... so the values written later are seen
    store.close()
    reopened = EmbeddedStore(path)  # a new process's view: cold cache, read from the file
    assert reopened.values("i", c.step_key) == vals
    reopened.close()
