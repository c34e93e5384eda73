"""Cell kinds and options: tags, ``#| runbook:`` directives and the cell's AST.

A code cell is one of (DESIGN.md §5):

* ``guarded`` (default): a durable step, claimed before it runs, run once;
* ``always``: re-run every time, never claimed - set by the tag
  ``runbook:always``, the directive ``#| runbook: always``, or found from the
  AST when the cell holds only imports, function/class definitions, constant
  assignments, docstrings and configuration magics (``%load_ext``, ``%runbook``
  ...);
* ``parameters`` / ``injected-parameters``: the papermill tags; run every time;
* nbclient's ``skip-execution`` tag: never run by nbclient, so no step either
  (classified ``always``: later cells do not wait for it).

nbclient's ``raises-exception`` tag keeps the cell a step whose error is
expected (``CellSpec.raises_exception``): it is recorded done with its error.

Options, from tags (``runbook:retry-safe``, ``runbook:unordered``,
``runbook:guarded``) or directive lines at the top of the cell, e.g.::

    #| runbook: retry-safe unordered
    #| runbook: save=model:pickle,report name=train

``save=a,b`` records those names even when the AST does not show them
assigned; ``name:pickle`` opts that one value in to pickle.
"""

from __future__ import annotations

import ast
import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from nbrunbook.engine.model import ALWAYS, GUARDED, INJECTED, PARAMETERS

TAG_PREFIX = "runbook:"
#: nbclient's tags (nbconvert and papermill honour them too).
RAISES_EXCEPTION_TAG = "raises-exception"
SKIP_EXECUTION_TAG = "skip-execution"
_DIRECTIVE = re.compile(r"^\s*#\|\s*runbook\s*:(.*)$")
_FLAGS = {"always", "guarded", "retry-safe", "unordered"}
#: Line magics that only configure the kernel: a cell of them (plus imports and
#: definitions) re-runs every time instead of being a step.
CONFIG_LINE_MAGICS = frozenset(
    {
        "aimport",
        "autoawait",
        "autoreload",
        "colors",
        "config",
        "load_ext",
        "matplotlib",
        "pdb",
        "precision",
        "reload_ext",
        "runbook",
        "unload_ext",
        "xmode",
    }
)
#: Cell magics that only display their body.
DISPLAY_CELL_MAGICS = frozenset({"html", "javascript", "js", "latex", "markdown", "svg"})


class DirectiveError(ValueError):
    """A ``#| runbook:`` directive line cannot be understood."""


@dataclass(frozen=True)
class SaveSpec:
    """A name listed in ``save=``, with its pickle opt-in."""

    name: str
    pickle: bool = False


@dataclass(frozen=True)
class CellSpec:
    """What the guard needs to know about a cell's source and tags."""

    kind: str = GUARDED
    retry_safe: bool = False
    unordered: bool = False
    save: tuple[SaveSpec, ...] = ()
    name: str = ""
    #: nbclient's ``raises-exception``: an error is the expected outcome.
    raises_exception: bool = False
    #: Directive problems, reported when the cell runs.
    problems: tuple[str, ...] = field(default=(), compare=False)

    @property
    def pickle_names(self) -> frozenset[str]:
        """Names whose values may be pickled (and unpickled) for this cell."""
        return frozenset(s.name for s in self.save if s.pickle)


def source_hash(source: str) -> str:
    """A stable hash of a cell's source (newlines normalised, outer whitespace ignored)."""
    text = source.replace("\r\n", "\n").strip()
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _directive_lines(source: str) -> Iterable[str]:
    """The ``#| runbook:`` payloads of the cell's leading comment block."""
    for line in source.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if not stripped.startswith("#"):
            return
        m = _DIRECTIVE.match(stripped)
        if m:
            yield m.group(1)


def parse_directives(source: str) -> tuple[set[str], dict[str, str], list[str]]:
    """Flags, ``key=value`` settings and problems found in the directives."""
    flags: set[str] = set()
    settings: dict[str, str] = {}
    problems: list[str] = []
    for payload in _directive_lines(source):
        for token in payload.replace(";", " ").split():
            if "=" in token:
                key, _, value = token.partition("=")
                key = key.strip().lower()
                if key in ("save", "name"):
                    settings[key] = (settings[key] + "," + value) if key == "save" and key in settings else value
                else:
                    problems.append(f"unknown directive setting {key!r}")
                continue
            for flag in filter(None, token.lower().split(",")):
                if flag in _FLAGS:
                    flags.add(flag)
                else:
                    problems.append(f"unknown directive {flag!r} (known: {', '.join(sorted(_FLAGS))}, save=, name=)")
    return flags, settings, problems


def parse_save(value: str) -> tuple[tuple[SaveSpec, ...], list[str]]:
    """``a,b:pickle`` -> save specs, plus problems."""
    specs: list[SaveSpec] = []
    problems: list[str] = []
    for item in filter(None, (v.strip() for v in value.split(","))):
        name, _, mode = item.partition(":")
        if not name.isidentifier():
            problems.append(f"save={item}: {name!r} is not a Python name")
            continue
        if mode and mode != "pickle":
            problems.append(f"save={item}: only ':pickle' may follow a name")
            continue
        specs.append(SaveSpec(name, mode == "pickle"))
    return tuple(specs), problems


def _is_constant(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return isinstance(node.operand, ast.Constant)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return all(_is_constant(e) for e in node.elts)
    if isinstance(node, ast.Dict):
        return all(k is not None and _is_constant(k) for k in node.keys) and all(_is_constant(v) for v in node.values)
    return False


def _magic_call(node: ast.AST) -> tuple[str, str] | None:
    """``get_ipython().run_line_magic('name', ...)`` -> ('line', 'name'); same for cell magics."""
    if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)):
        return None
    call = node.value
    func = call.func
    if not (isinstance(func, ast.Attribute) and func.attr in ("run_line_magic", "run_cell_magic")):
        return None
    owner = func.value
    if not (isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "get_ipython"):
        return None
    if not call.args or not isinstance(call.args[0], ast.Constant) or not isinstance(call.args[0].value, str):
        return None
    return ("line" if func.attr == "run_line_magic" else "cell", call.args[0].value)


def _always_statement(node: ast.stmt) -> bool:
    if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Pass)):
        return True
    if isinstance(node, ast.Assign):
        return all(isinstance(t, ast.Name) for t in node.targets) and _is_constant(node.value)
    if isinstance(node, ast.AnnAssign):
        return isinstance(node.target, ast.Name) and (node.value is None or _is_constant(node.value))
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
        return True  # a docstring or a bare literal
    magic = _magic_call(node)
    if magic is not None:
        kind, name = magic
        return name in (CONFIG_LINE_MAGICS if kind == "line" else DISPLAY_CELL_MAGICS)
    return False


def is_always(tree: ast.Module) -> bool:
    """True if the module holds only imports, definitions, constants and configuration magics."""
    return all(_always_statement(node) for node in tree.body)


class _Assigned(ast.NodeVisitor):
    """Names bound at module level (not inside functions, classes, lambdas, comprehensions)."""

    def __init__(self) -> None:
        self.names: dict[str, None] = {}

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Store):
            self.names[node.id] = None

    def _skip(self, node: ast.AST) -> None:
        return None

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = visit_Lambda = _skip
    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _skip
    visit_Import = visit_ImportFrom = _skip  # modules are never data


def assigned_names(tree: ast.AST) -> list[str]:
    """Names the cell assigns at top level, in order, without private (``_x``) names."""
    visitor = _Assigned()
    visitor.visit(tree)
    return [n for n in visitor.names if not n.startswith("_")]


def display_name(source: str, fallback: str) -> str:
    """A short human name: the first comment line, else the first code line that is not an import (40 chars)."""
    first = ""
    for line in source.splitlines():
        text = line.strip()
        if not text or _DIRECTIVE.match(text):
            continue
        if text.startswith("#"):
            text = text.lstrip("#").strip()
            if not text:
                continue
            break
        if text.startswith(("import ", "from ")):
            first = first or text
            continue
        break
    else:
        text = first
    if not text:
        return fallback
    return text if len(text) <= 40 else text[:39] + "…"


def parse_python(source: str, transform: Callable[[str], str] | None = None) -> ast.Module | None:
    """The cell's AST after IPython's syntax transforms (magics, ``!cmd``); None if it does not parse."""
    try:
        if transform is None:
            from IPython.core.inputtransformer2 import TransformerManager

            transform = TransformerManager().transform_cell
        return ast.parse(transform(source))
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        return None


def classify(
    source: str,
    tags: Sequence[str] = (),
    *,
    fallback_name: str = "",
    transform: Callable[[str], str] | None = None,
) -> CellSpec:
    """The spec of a cell from its tags, directives and (when no tag decides) its AST."""
    tagset = {str(t) for t in tags}
    flags, settings, problems = parse_directives(source)
    for tag in tagset:
        if tag.startswith(TAG_PREFIX):
            flag = tag[len(TAG_PREFIX) :]
            if flag in _FLAGS:
                flags.add(flag)
            else:
                problems.append(f"unknown tag {tag!r}")
    save, save_problems = parse_save(settings.get("save", ""))
    problems.extend(save_problems)
    if SKIP_EXECUTION_TAG in tagset:
        kind = ALWAYS
    elif "parameters" in tagset:
        kind = PARAMETERS
    elif INJECTED in tagset:
        kind = INJECTED
    elif "always" in flags and "guarded" in flags:
        problems.append("both always and guarded given: the cell is guarded")
        kind = GUARDED
    elif "always" in flags:
        kind = ALWAYS
    elif "guarded" in flags:
        kind = GUARDED
    elif not source.strip():
        kind = ALWAYS
    else:
        tree = parse_python(source, transform)
        kind = ALWAYS if tree is not None and is_always(tree) else GUARDED
    return CellSpec(
        kind=kind,
        retry_safe="retry-safe" in flags,
        unordered="unordered" in flags,
        save=save,
        name=settings.get("name") or display_name(source, fallback_name),
        raises_exception=RAISES_EXCEPTION_TAG in tagset,
        problems=tuple(problems),
    )
