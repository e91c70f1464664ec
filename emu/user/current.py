"""`current`: this process's emulated thread, or None before attach() and after it
exited.  One place for what every part of the worker side asks ("which thread am
I?"), as the kernel asks `current`."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .task import Task

task: Task | None = None
