"""Loading python handlers as root without running code that someone else could have written.

Both `FILE.py:function` and `module:function` handlers are read from descriptors that
superd.strict checked (the file and every directory above it), never re-opened by name, and
compiled from that source: no bytecode cache is read (a `__pycache__` beside the module is
one more file others might write) or written (it would land in /etc/superd). While a handler
loads, every module it imports through sys.path is checked the same way; an extension module
is checked where it lies and then loaded from there, which after the check only root and
superd's user could change.

Modules imported later, inside a running handler, are the handler's business.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from superd import strict
from superd.values import Missing


def load_file(path: str, name: str) -> types.ModuleType:
    """Compile FILE.py from its source every time: a reload must run what is on disk now."""
    try:
        source = strict.read_trusted(path)
    except FileNotFoundError:
        raise Missing(f"{path}: no such file") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror}") from None
    code = compile(source, path, "exec", dont_inherit=True)
    module = types.ModuleType(name)
    module.__file__ = path
    # a changed source is a changed service: its host process is replaced on reload
    module.__superd_source__ = hashlib.sha256(source).hexdigest()  # type: ignore[attr-defined]
    sys.modules[name] = module  # for dataclasses, pickling and the like inside the handler
    try:
        with checked_imports():
            exec(code, module.__dict__)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def import_module(target: str, folder: str) -> types.ModuleType:
    """Import `target` (the table's folder on sys.path), checking each file it takes."""
    if folder not in sys.path:
        sys.path.append(folder)
    with checked_imports():
        return importlib.import_module(target)


@contextmanager
def checked_imports() -> Iterator[None]:
    """While inside, path-based imports go through _CheckedFinder."""
    finder = _CheckedFinder()
    at = next((i for i, f in enumerate(sys.meta_path) if f is importlib.machinery.PathFinder),
              len(sys.meta_path))
    sys.meta_path.insert(at, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


class _CheckedFinder:
    """Find modules as the path finder does; load sources only through a checked descriptor."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None:
            return None
        loader = spec.loader
        if isinstance(loader, importlib.machinery.SourceFileLoader):
            spec.loader = _CheckedSource(loader.name, loader.path)
            spec.cached = None
        elif spec.has_location and spec.origin:  # an extension or a bytecode-only module
            strict.check_file(spec.origin)
        return spec

    def invalidate_caches(self) -> None:
        pass


class _CheckedSource(importlib.machinery.SourceFileLoader):
    def get_code(self, fullname: str) -> types.CodeType:
        path = self.get_filename(fullname)
        return compile(strict.read_trusted(path), path, "exec", dont_inherit=True)
