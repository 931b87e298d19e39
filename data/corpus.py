"""The embedded default corpus: the running Python's own standard-library ``.py`` files.

Real code, present on every machine that runs this stack, no download: the quickstart trains on it. The
list is sorted so every process (and every run) sees the same documents in the same order.
"""

from __future__ import annotations

import os
import sysconfig

# Third-party packages installed into the interpreter's lib directory are not the standard library.
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: str | None = None) -> list[str]:
    """Sorted paths of the non-empty ``.py`` files of the standard library (about 1,800 files, 34 MB)."""
    root = root or stdlib_root()
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _EXCLUDED_DIRS)
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                # Empty files (many __init__.py) are no documents; leaving them out keeps the skip count for
                # real problems.
                if os.path.getsize(path) > 0:
                    files.append(path)
    return sorted(files)
