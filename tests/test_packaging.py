"""One distribution, one namespace: ``nbrunbook.engine`` etc., never bare ``engine``."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def test_subpackages_are_mapped_under_nbrunbook(tmp_path: Path) -> None:
    code = (
        "import importlib.util, nbrunbook, nbrunbook.engine, nbrunbook.kernel_ext, nbrunbook.widgets;"
        "print([importlib.util.find_spec(n) is None for n in ('engine', 'kernel_ext', 'widgets')])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[True, True, True]"


def test_importing_nbrunbook_has_no_heavy_side_effects(tmp_path: Path) -> None:
    code = (
        "import sys, nbrunbook;"
        "heavy = ('duckdb', 'IPython', 'ipywidgets', 'nbclient', 'jupyter_client');"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert not list(tmp_path.iterdir())  # and wrote nothing


def test_ulids_sort_by_time() -> None:
    from nbrunbook.engine.keys import ulid

    earlier = ulid(1_700_000_000.0)
    time.sleep(0.002)
    assert earlier < ulid(1_700_000_001.0) and len(earlier) == 26
