"""Objects that outlive policy reloads (JWKS key caches, introspection states), one per key.

A reload builds its pipeline in a worker thread (``get_or_create``) while the event loop may be releasing what the
new policy no longer uses (``retain``), hence the lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterable
from typing import Generic, Protocol, TypeVar


class Closable(Protocol):
    async def close(self) -> None: ...


V = TypeVar("V", bound=Closable)


class SharedByKey(Generic[V]):
    def __init__(self) -> None:
        self._items: dict[Hashable, V] = {}
        self._lock = threading.Lock()

    def get_or_create(self, key: Hashable, create: Callable[[], V]) -> V:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                item = self._items[key] = create()
            return item

    def values(self) -> list[V]:
        with self._lock:
            return list(self._items.values())

    async def retain(self, used: Iterable[V]) -> None:
        """Close and forget everything not in ``used`` (call after a reload swapped in a new policy)."""
        keep = {id(item) for item in used}
        with self._lock:
            unused = [(key, item) for key, item in self._items.items() if id(item) not in keep]
            for key, _ in unused:
                del self._items[key]
        for _, item in unused:
            await item.close()

    async def close(self) -> None:
        await self.retain(())
