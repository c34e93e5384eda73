"""HTML fragments for the dashboards (escaped; no scripts, no external assets)."""

from __future__ import annotations

import datetime as dt
import html
import json

from nbrunbook.engine import model

from .model import FanOut, InstanceView

COLOURS = {
    "done": "#2e7d32",
    "skipped": "#607d8b",
    "running": "#1565c0",
    "failed": "#c62828",
    "interrupted": "#ef6c00",
    "pending": "#9e9e9e",
    "always": "#9e9e9e",
}
_TABLE = "border-collapse:collapse;font-family:monospace;font-size:12px"
_CELL = "padding:2px 8px;border-bottom:1px solid #ddd;text-align:left"


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def badge(status: str) -> str:
    """A coloured status word."""
    colour = COLOURS.get(status, "#444")
    return f'<span class="nbrb-status nbrb-{_e(status)}" style="color:{colour};font-weight:bold">{_e(status)}</span>'


def _when(ts: float | None) -> str:
    if ts is None:
        return ""
    return dt.datetime.fromtimestamp(ts).strftime("%H:%M:%S")


def _took(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.1f}s" if seconds < 60 else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def header(view: InstanceView) -> str:
    """Runbook, instance, parameters and status."""
    inst = view.instance
    params = json.dumps(inst.params, sort_keys=True) if inst else "{}"
    runbook = inst.runbook if inst else "?"
    return (
        f'<div class="nbrb-header"><b>{_e(runbook)}</b> · instance <code class="nbrb-instance">'
        f"{_e(view.instance_id)}</code> · {badge(view.status)}<br>"
        f'<span style="font-size:11px;color:#555">params <code>{_e(params)}</code></span></div>'
    )


def progress_label(view: InstanceView) -> str:
    """``3/5 done · 1 running · 1 failed``."""
    c = view.counts()
    parts = [f'<span class="nbrb-progress">{c["finished"]}/{c["total"]} done</span>']
    for k in ("running", "failed", "interrupted"):
        if c[k]:
            parts.append(f'<span class="nbrb-count-{k}">{c[k]} {k}</span>')
    return " · ".join(parts)


def cells_table(view: InstanceView) -> str:
    """One row per manifest cell: status, attempt, owner, duration."""
    rows = [
        f'<tr><th style="{_CELL}">#</th><th style="{_CELL}">cell</th><th style="{_CELL}">status</th>'
        f'<th style="{_CELL}">attempt</th><th style="{_CELL}">owner</th><th style="{_CELL}">took</th></tr>'
    ]
    for cell, v in view.rows():
        status = v.status if v else ("pending" if cell.kind == model.GUARDED else "always")
        name = cell.name or cell.cell_id
        attempt = f"{v.attempt}" + (f" (inv {v.invocation})" if v.invocation > 1 else "") if v else ""
        owner = (v.owner or "").split(":")[0] if v else ""
        rows.append(
            f'<tr class="nbrb-row" data-cell="{_e(cell.cell_id)}" data-status="{_e(status)}">'
            f'<td style="{_CELL}">{cell.index}</td><td style="{_CELL}" title="{_e(cell.cell_id)}">{_e(name[:48])}</td>'
            f'<td style="{_CELL}">{badge(status)}</td><td style="{_CELL}">{_e(attempt)}</td>'
            f'<td style="{_CELL}">{_e(owner)}</td><td style="{_CELL}">{_took(v.duration) if v else ""}</td></tr>'
        )
    return f'<table class="nbrb-cells" style="{_TABLE}">' + "".join(rows) + "</table>"


def fanout_block(fan: FanOut, max_keys: int = 12) -> str:
    """Counts by status and the failed keys of one fan-out."""
    counts = fan.counts()
    total = sum(counts.values())
    cells = " ".join(
        f'<span class="nbrb-fan-{k}" style="color:{COLOURS[k]}">{counts[k]} {k}</span>' for k in counts if counts[k]
    )
    failed = fan.failed_keys()
    shown = ", ".join(f"<code>{_e(k.rsplit('/', 1)[-1])}</code>" for k in failed[:max_keys])
    more = f" and {len(failed) - max_keys} more" if len(failed) > max_keys else ""
    fail_line = f'<br><span class="nbrb-failed-keys">failed: {shown}{more}</span>' if failed else ""
    return (
        f'<div class="nbrb-fanout" data-parent="{_e(fan.parent)}" style="font-size:12px;margin:2px 0">'
        f"<code>{_e(fan.parent)}</code>: {total} branches · {cells}{fail_line}</div>"
    )


def fanouts(view: InstanceView) -> str:
    """A block per fan-out, grouped by cell."""
    blocks = [fanout_block(f) for _, f in sorted(view.fanouts.items())]
    return "".join(blocks) if blocks else '<div style="font-size:12px;color:#777">no parallel branches</div>'


def journal_tail(view: InstanceView) -> str:
    """The last events, newest last."""
    lines = []
    for e in view.tail:
        lines.append(f"{e.seq:>6} {_when(e.ts)} {e.event:<14} {e.step_key or '':<32} {(e.run_id or '')[-8:]}".rstrip())
    body = _e("\n".join(lines)) or "(no events)"
    return f'<pre class="nbrb-journal" style="font-size:11px;max-height:16em;overflow:auto;margin:0">{body}</pre>'


def instances_table(summaries: list[model.InstanceSummary]) -> str:
    """The store dashboard's list of instances."""
    rows = [
        f'<tr><th style="{_CELL}">instance</th><th style="{_CELL}">runbook</th><th style="{_CELL}">status</th>'
        f'<th style="{_CELL}">progress</th><th style="{_CELL}">created</th></tr>'
    ]
    for s in summaries:
        created = dt.datetime.fromtimestamp(s.created_at).strftime("%Y-%m-%d %H:%M")
        rows.append(
            f'<tr class="nbrb-instance-row" data-instance="{_e(s.instance_id)}">'
            f'<td style="{_CELL}"><code>{_e(s.instance_id)}</code></td><td style="{_CELL}">{_e(s.runbook)}</td>'
            f'<td style="{_CELL}">{badge(s.status)}</td><td style="{_CELL}">{s.done}/{s.total}</td>'
            f'<td style="{_CELL}">{created}</td></tr>'
        )
    return f'<table class="nbrb-instances" style="{_TABLE}">' + "".join(rows) + "</table>"
