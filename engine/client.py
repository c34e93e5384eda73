"""``ServerStore``: the store as a client of the store server (DESIGN.md §4).

Behaves exactly like the embedded store - the contract suite runs against
both - while the DuckDB file lives in one server process that every kernel,
headless run and dashboard of the machine shares. This module never imports
DuckDB: a kernel that talks to the server does not pay for it (DESIGN.md §10).

The first client starts the server (:mod:`.launch`); all stores and threads
of a process share one connection (:mod:`.link`), which is also the
process's life line: when it ends, the server releases the process's running
claims at once. Every claim carries a token, so a claim sent again after a
lost connection finds its own commit instead of a busy step.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

from . import model, protocol
from .errors import StoreError, ValueNotSerializable
from .link import acquire, release
from .store import DEFAULT_LEASE, Store


def _json_params(what: str, params: Mapping[str, Any]) -> dict[str, Any]:
    # The same check as the embedded store, made here: the wire would turn
    # an unserialisable value into its str() instead of refusing it.
    try:
        text = json.dumps(dict(params), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueNotSerializable(what, type(exc).__name__, str(exc)) from None
    result: dict[str, Any] = json.loads(text)
    return result


class ServerStore(Store):
    """A :class:`Store` served by the store server of ``path`` (started on demand)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.location = os.path.abspath(os.fspath(path))
        self._paths = protocol.server_paths(self.location)
        self._link = acquire(self._paths, self.location)
        self._closed = False

    @property
    def server_info(self) -> dict[str, Any]:
        """What the server said when this process connected: pid, protocol, version, socket."""
        return dict(self._link.server_info)

    def _call(self, op: str, **args: Any) -> Any:
        return self._future(op, **args).result()

    def _future(self, op: str, **args: Any) -> Future[Any]:
        if self._closed:
            raise StoreError(self.location, "the store is closed")
        link = self._link
        if link.pid != os.getpid():  # forked: the child needs its own connection
            self._link = link = acquire(self._paths, self.location)
        return link.call(op, args)

    # --------------------------------------------------------------- runbooks

    def pin_manifest(self, runbook: str, cells: Sequence[model.ManifestCell], *, path: str = "") -> model.Manifest:
        result: model.Manifest = self._call("pin_manifest", runbook=runbook, cells=list(cells), path=path)
        return result

    def manifest(self, runbook: str, version: int | None = None) -> model.Manifest:
        result: model.Manifest = self._call("manifest", runbook=runbook, version=version)
        return result

    # -------------------------------------------------------------- instances

    def open_instance(
        self,
        runbook: str,
        instance_id: str,
        params: Mapping[str, Any],
        *,
        manifest_version: int,
        owner: str,
        run_id: str,
        options: Mapping[str, Any] | None = None,
        force_params: bool = False,
    ) -> tuple[model.Instance, bool]:
        result: tuple[model.Instance, bool] = self._call(
            "open_instance",
            runbook=runbook,
            instance_id=instance_id,
            params=_json_params("parameters", params),
            manifest_version=manifest_version,
            owner=owner,
            run_id=run_id,
            options=_json_params("parameters", options or {}),
            force_params=force_params,
        )
        return result

    def get_instance(self, instance_id: str) -> model.Instance:
        result: model.Instance = self._call("get_instance", instance_id=instance_id)
        return result

    # ------------------------------------------------------------------ steps

    def claim(
        self,
        instance_id: str,
        path: str,
        *,
        owner: str,
        run_id: str,
        token: str | None = None,
        lease: float = DEFAULT_LEASE,
        retry_safe: bool = False,
        rerun_interrupted: bool = False,
        requires: Sequence[str] = (),
        max_attempts: int | None = None,
        with_values: bool = False,
    ) -> model.Claim:
        result: model.Claim = self._call(
            "claim",
            instance_id=instance_id,
            path=path,
            owner=owner,
            run_id=run_id,
            # Every claim carries a token, so a re-sent claim finds its own commit.
            token=token or _token(),
            lease=lease,
            retry_safe=retry_safe,
            rerun_interrupted=rerun_interrupted,
            requires=list(requires),
            max_attempts=max_attempts,
            with_values=with_values,
        )
        return result

    def claim_many(
        self,
        instance_id: str,
        paths: Sequence[str],
        *,
        owner: str,
        run_id: str,
        token: str | None = None,
        lease: float = DEFAULT_LEASE,
        retry_safe: bool = False,
        rerun_interrupted: bool = False,
        max_attempts: int | None = None,
    ) -> list[model.Claim]:
        result: list[model.Claim] = self._call(
            "claim_many",
            instance_id=instance_id,
            paths=list(paths),
            owner=owner,
            run_id=run_id,
            token=token or _token(),
            lease=lease,
            retry_safe=retry_safe,
            rerun_interrupted=rerun_interrupted,
            max_attempts=max_attempts,
        )
        return result

    def renew(
        self, instance_id: str, step_key: str, *, owner: str, epoch: int, lease: float = DEFAULT_LEASE
    ) -> model.StepState:
        result: model.StepState = self._call(
            "renew", instance_id=instance_id, step_key=step_key, owner=owner, epoch=epoch, lease=lease
        )
        return result

    def complete(
        self,
        instance_id: str,
        step_key: str,
        *,
        owner: str,
        epoch: int,
        run_id: str,
        payload: Mapping[str, Any] | None = None,
        values: Mapping[str, model.EncodedValue] | None = None,
        wait: bool = True,
    ) -> model.StepState | Future[model.StepState]:
        fut = self._future(
            "complete",
            instance_id=instance_id,
            step_key=step_key,
            owner=owner,
            epoch=epoch,
            run_id=run_id,
            payload=dict(payload) if payload is not None else None,
            values=dict(values) if values is not None else None,
            wait=wait,
        )
        if wait:
            result: model.StepState = fut.result()
            return result
        return fut

    def fail(
        self,
        instance_id: str,
        step_key: str,
        *,
        owner: str,
        epoch: int,
        run_id: str,
        error: Mapping[str, Any],
        wait: bool = True,
        interrupted: bool = False,
    ) -> model.StepState | Future[model.StepState]:
        extra = {"interrupted": True} if interrupted else {}  # a plain fail stays readable by older servers
        fut = self._future(
            "fail",
            instance_id=instance_id,
            step_key=step_key,
            owner=owner,
            epoch=epoch,
            run_id=run_id,
            error=dict(error),
            wait=wait,
            **extra,
        )
        if wait:
            result: model.StepState = fut.result()
            return result
        return fut

    def rerun(self, instance_id: str, path: str, *, owner: str, run_id: str, reason: str = "") -> model.StepState:
        result: model.StepState = self._call(
            "rerun", instance_id=instance_id, path=path, owner=owner, run_id=run_id, reason=reason
        )
        return result

    def resolve(
        self, instance_id: str, path: str, decision: str, *, owner: str, run_id: str, note: str = ""
    ) -> model.StepState:
        result: model.StepState = self._call(
            "resolve", instance_id=instance_id, path=path, decision=decision, owner=owner, run_id=run_id, note=note
        )
        return result

    def release_owner(self, owner: str, *, reason: str, run_id: str | None = None) -> list[model.StepState]:
        result: list[model.StepState] = self._call("release_owner", owner=owner, reason=reason, run_id=run_id)
        return result

    def append(
        self,
        instance_id: str,
        event: str,
        *,
        owner: str,
        run_id: str,
        step_key: str | None = None,
        payload: Mapping[str, Any] | None = None,
        once: bool = False,
    ) -> model.Event:
        result: model.Event = self._call(
            "append",
            instance_id=instance_id,
            event=event,
            owner=owner,
            run_id=run_id,
            step_key=step_key,
            payload=dict(payload) if payload is not None else None,
            once=once,
        )
        return result

    # ------------------------------------------------------------------ reads

    def step(self, instance_id: str, path: str) -> model.StepState | None:
        result: model.StepState | None = self._call("step", instance_id=instance_id, path=path)
        return result

    def steps(self, instance_id: str, *, parent: str | None = None) -> list[model.StepState]:
        result: list[model.StepState] = self._call("steps", instance_id=instance_id, parent=parent)
        return result

    def instance_status(self, instance_id: str) -> model.InstanceStatus:
        result: model.InstanceStatus = self._call("instance_status", instance_id=instance_id)
        return result

    def journal(self, instance_id: str, since_seq: int = 0, limit: int | None = None) -> list[model.Event]:
        result: list[model.Event] = self._call("journal", instance_id=instance_id, since_seq=since_seq, limit=limit)
        return result

    def instances(self, *, runbook: str | None = None, status: str | None = None) -> list[model.InstanceSummary]:
        result: list[model.InstanceSummary] = self._call("instances", runbook=runbook, status=status)
        return result

    def values(self, instance_id: str, step_key: str) -> dict[str, model.EncodedValue]:
        result: dict[str, model.EncodedValue] = self._call("values", instance_id=instance_id, step_key=step_key)
        return result

    def wait(self, instance_id: str, path: str, *, timeout: float) -> model.StepState | None:
        result: model.StepState | None = self._call("wait", instance_id=instance_id, path=path, timeout=timeout)
        return result

    def subscribe(
        self, instance_id: str, callback: Callable[[list[model.Event]], None], *, since_seq: int = 0
    ) -> Callable[[], None]:
        if self._closed:
            raise StoreError(self.location, "the store is closed")
        link = self._link
        sub = link.subscribe(instance_id, callback, since_seq)
        return lambda: link.unsubscribe(sub)

    def flush(self) -> None:
        self._call("flush")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        release(self._link)


def _token() -> str:
    return "t-" + secrets.token_hex(8)
