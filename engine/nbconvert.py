"""``jupyter nbconvert --execute`` with the runbook guard: :class:`RunbookPreprocessor`.

Enable it in place of nbconvert's own execute preprocessor with one flag,
``--NotebookExporter.default_preprocessors=nbrunbook.engine.nbconvert.RunbookPreprocessor``::

    jupyter nbconvert --to notebook --execute \\
        --NotebookExporter.default_preprocessors=nbrunbook.engine.nbconvert.RunbookPreprocessor \\
        --RunbookPreprocessor.instance=INSTANCE notebook.ipynb

(The flag replaces the exporter's default list, whose execute preprocessor
would otherwise run the cells unguarded first.)

The notebook is executed exactly like ``nbrunbook run`` would (same client,
same store beside the notebook unless ``--RunbookPreprocessor.store`` says
otherwise, same exit rules): done cells are skipped and replayed, nothing runs
twice. A failing or refused cell makes nbconvert fail with the engine's
message, after the partial outputs were recorded in the notebook.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from nbclient.exceptions import CellExecutionError
from nbconvert.preprocessors import Preprocessor
from traitlets import Bool, Dict, Float, Unicode


class RunbookPreprocessor(Preprocessor):
    """Execute the notebook as one advance of a runbook instance."""

    enabled = Bool(True, help="run the notebook through nbrunbook (on by default once listed)").tag(config=True)
    instance = Unicode("", help="instance id (default: a new generated id)").tag(config=True)
    store = Unicode(
        "", help="store path (default: $NBRUNBOOK_STORE, else .nbrunbook/store.duckdb beside the notebook)"
    ).tag(config=True)
    parameters = Dict(help="parameters of a new instance (papermill-style values)").tag(config=True)
    on_changed = Unicode("error", help="a done cell whose source changed: error, rerun or skip").tag(config=True)
    rerun_interrupted = Bool(False, help="run interrupted cells again instead of stopping").tag(config=True)
    cell_timeout = Float(0.0, help="seconds a cell may run (0: no limit)").tag(config=True)
    kernel_name = Unicode("", help="kernel name (default: the notebook's)").tag(config=True)

    def preprocess(self, nb: Any, resources: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """Run the runbook; the executed notebook replaces ``nb``."""
        from . import cli_run
        from .runner import RunbookClient, RunnerError

        meta = resources.get("metadata", {})
        directory = meta.get("path") or os.getcwd()
        path = os.path.join(directory, f"{meta.get('name', 'notebook')}.ipynb")
        args = argparse.Namespace(
            notebook=path,
            instance=self.instance or None,
            parameters=[],
            parameters_raw=[(k, v) for k, v in self.parameters.items() if isinstance(v, str)],
            parameters_file=[],
            parameters_yaml=[],
            kernel=self.kernel_name or None,
            cwd=directory,
            store=self.store or None,
        )
        typed = {k: v for k, v in self.parameters.items() if not isinstance(v, str)}
        prepared, path, params, _ = cli_run.prepare(args)
        params.update(typed)
        store = args.store  # canonical: cli_run.check made it so
        instance = self.instance or cli_run.new_instance_id()
        stored = cli_run._stored_params(store, self.instance or None)
        executed = cli_run.inject(prepared, stored if (stored is not None and not params) else params)
        client = RunbookClient(
            executed,
            notebook_path=path,
            instance_id=instance,
            store=store,
            params=params if (params or stored is None) else None,
            options={"mode": "headless", "on_changed": self.on_changed, "rerun_interrupted": self.rerun_interrupted},
            runbook=os.path.splitext(os.path.basename(path))[0],
            kernel_name=args.kernel,
            timeout=self.cell_timeout or None,
            resources={"metadata": {"path": directory}},
        )
        try:
            client.run()
        except RunnerError as exc:
            cli_run._step_metadata(executed, store, instance)
            raise CellExecutionError(
                f"nbrunbook: instance {instance}: {exc.message}", "RunbookError", exc.message
            ) from None
        cli_run._step_metadata(executed, store, instance)
        executed.metadata["nbrunbook"] = {"instance_id": instance, "store": store, "parameters": params}
        return executed, resources
