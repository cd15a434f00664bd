"""Read YAML into plain values while remembering the line of every value.

PyYAML's `safe_load` forgets where things came from, and `superd check` must name the line of
each mistake. So we compose the node graph ourselves and convert it, recording for every path
(("services", "echo", "listen") ...) the line its value starts on. Converting by hand also lets
us bound the work: aliases are expanded under a node budget (a "billion laughs" table is refused
instead of eating memory) and nesting is capped (instead of a RecursionError traceback).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner

from superd import strict

MAX_NODES = 100_000  # values after alias expansion; a real table has a few hundred
MAX_DEPTH = 64
MAX_BYTES = 1024 * 1024  # a table of thousands of services is still a few hundred KiB

Path = tuple[Any, ...]


@dataclass(frozen=True)
class Problem:
    """One mistake, printed as `FILE:LINE: FIELD: message` (SPEC §1)."""

    file: str
    line: int | None
    where: str
    message: str
    transient: bool = False  # about the machine, not the table: may go away by itself

    def __str__(self) -> str:
        loc = self.file if self.line is None else f"{self.file}:{self.line}"
        text = f"{loc}: {self.where}: {self.message}" if self.where else f"{loc}: {self.message}"
        # One line, printable: no newlines from library messages, no lone surrogates.
        return " ".join(text.split()).encode("utf-8", "backslashreplace").decode("utf-8")


class TableError(Exception):
    """Raised with every problem found, so they can all be reported at once."""

    def __init__(self, problems: list[Problem]):
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


@dataclass
class Document:
    """A loaded YAML file: its value and the line of every path in it."""

    file: str
    value: Any
    lines: dict[Path, int] = field(default_factory=dict)

    def line(self, path: Path) -> int:
        """The line of `path`, or of its nearest ancestor that has one."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), 1)

    def problem(self, path: Path, message: str, transient: bool = False) -> Problem:
        return Problem(self.file, self.line(path), dotted(path), message, transient)


def dotted(path: Path) -> str:
    """("services", "echo", "listen", 0) -> "services.echo.listen[0]"."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def load(file: str) -> Document:
    """Read and convert one YAML file; raise TableError naming the file and line."""
    try:
        data = strict.read_trusted(file, MAX_BYTES + 1)
    except strict.Untrusted as e:
        raise TableError([Problem(file, None, "", e.reason)]) from None
    except OSError as e:
        raise TableError([Problem(file, None, "", f"cannot read: {e.strerror}")]) from None
    if len(data) > MAX_BYTES:
        raise TableError([Problem(file, None, "", f"larger than {MAX_BYTES} bytes")])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TableError([Problem(file, None, "", f"not UTF-8: {e.reason}")]) from None
    try:
        root = _compose(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        raise TableError([Problem(file, line, "", f"YAML: {e.problem or e.context}")]) from None
    except yaml.YAMLError as e:
        raise TableError([Problem(file, None, "", f"YAML: {e}")]) from None
    except RecursionError:
        raise TableError([Problem(file, None, "", "YAML nested too deeply")]) from None
    doc = Document(file, None)
    if root is None:
        return doc
    converter = _Converter(doc)
    try:
        doc.value = converter.convert(root, ())
    except _Refused as e:
        raise TableError([Problem(file, e.line, "", e.message)]) from None
    if converter.problems:
        raise TableError(converter.problems)
    return doc


class _Budget(Composer, Resolver):
    """Refuse a document with too many nodes while composing it, not after: a few megabytes
    of `[0,0,0,...]` would otherwise cost a gigabyte before any check could run. Composing
    stays in Python to count; scanning and parsing are libyaml's where it is installed (a
    table at the node limit is refused in 0.6 s instead of 2.5)."""

    nodes = 0

    def compose_node(self, parent: Node | None, index: object) -> Node:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise yaml.YAMLError(f"more than {MAX_NODES} values")
        return super().compose_node(parent, index)  # type: ignore[arg-type,return-value]


class _PythonLoader(_Budget, Reader, Scanner, Parser):
    def __init__(self, text: str):
        Reader.__init__(self, text)
        Scanner.__init__(self)
        Parser.__init__(self)
        Composer.__init__(self)
        Resolver.__init__(self)


try:
    from yaml._yaml import CParser
except ImportError:  # PyYAML without libyaml
    _Loader: type[_Budget] = _PythonLoader
else:
    class _CLoader(_Budget, CParser):
        def __init__(self, text: str):
            CParser.__init__(self, text)
            Composer.__init__(self)
            Resolver.__init__(self)

    _Loader = _CLoader


def _compose(text: str) -> Node | None:
    loader = _Loader(text)  # type: ignore[call-arg]
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()  # type: ignore[attr-defined]


class _Refused(Exception):
    def __init__(self, line: int, message: str):
        self.line, self.message = line, message


class _Converter:
    """Turn a node graph into dicts, lists and scalars under a size and depth budget."""

    def __init__(self, doc: Document):
        self.doc = doc
        self.budget = MAX_NODES
        self.constructor = SafeConstructor()
        self.problems: list[Problem] = []

    def convert(self, node: Node, path: Path, depth: int = 0) -> Any:
        line = node.start_mark.line + 1
        self.budget -= 1
        if self.budget < 0:
            raise _Refused(line, f"more than {MAX_NODES} values (an alias bomb?)")
        if depth > MAX_DEPTH:
            raise _Refused(line, f"nested deeper than {MAX_DEPTH} levels")
        self.doc.lines[path] = line
        if isinstance(node, ScalarNode):
            try:
                return self.constructor.construct_object(node)
            except (yaml.YAMLError, ValueError, OverflowError) as e:
                reason = getattr(e, "problem", None) or str(e)
                self.problems.append(Problem(self.doc.file, line, dotted(path),
                                             f"bad value: {reason}"))
                return None
        if isinstance(node, SequenceNode):
            return [self.convert(child, path + (i,), depth + 1)
                    for i, child in enumerate(node.value)]
        if isinstance(node, MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                # Keys are names (services, fields): take them as written, so that a service
                # called `off`, `yes` or `123` is not turned into a boolean or a number.
                if not isinstance(key_node, ScalarNode):
                    self.problems.append(
                        Problem(self.doc.file, key_node.start_mark.line + 1, dotted(path),
                                "keys must be plain strings"))
                    continue
                key = key_node.value
                if key in out:
                    self.problems.append(
                        Problem(self.doc.file, key_node.start_mark.line + 1, dotted(path + (key,)),
                                "given twice"))
                    continue
                out[key] = self.convert(value_node, path + (key,), depth + 1)
                if path == ("services",) and not isinstance(value_node, ScalarNode):
                    # A service's block mapping starts on the line after its name: a problem
                    # with the service as a whole is told at its name.
                    self.doc.lines[path + (key,)] = key_node.start_mark.line + 1
            return out
        raise _Refused(line, f"unsupported YAML node {type(node).__name__}")
