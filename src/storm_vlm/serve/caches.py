"""What `StormEngine` keeps from one request for the next, each bounded in bytes, least recently
used out first.

A chat client sends the whole conversation, video included, with every turn (the web page sends
its clip with every question). Two things of an earlier turn can then be reused:

- `VideoTokenCache`: a video's visual tokens (vision tower and projector), keyed by the frames'
  content and the sampling stride, so the video is not encoded again;
- `PrefixCache`: the LLM's KV cache of an earlier conversation, so a request whose prompt starts
  with that conversation (its video included) prefills only what follows.

Videos are identified by `video_keys`: a SHA-256 of each video's frames and shape, with the
stride (the one request setting that changes a video's tokens).
"""

from __future__ import annotations

import collections

import torch

from storm_vlm.model.kv_cache import GrowingKVLayer, StormKVCache, reusable_start
from storm_vlm.utils import array_key

__all__ = ["video_keys", "VideoTokenCache", "PrefixCache"]


def video_keys(videos, stride: int | None, by_content: bool = True) -> list[tuple]:
    """A key per video ((T, H, W, 3) uint8 arrays): a SHA-256 of its frames' bytes, shape and dtype
    with `stride`; or, without `by_content`, the array's identity (enough to find the copies of one
    array inside one batch, without hashing). An array given more than once (the choices of a
    request with n > 1 share their videos) is hashed once."""
    named: dict[int, tuple] = {}
    for video in videos:
        if id(video) not in named:
            named[id(video)] = (*array_key(video), stride) if by_content else (id(video), stride)
    return [named[id(video)] for video in videos]


class _BoundedLRU:
    """{key: value} of at most `max_bytes` (each value's size given when put), least recently used
    out first; a value larger than the whole budget is not kept."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: collections.OrderedDict = collections.OrderedDict()  # key -> (value, size)

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key):
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key, value, size: int) -> None:
        if size > self.max_bytes:
            return
        if key in self._items:
            self.bytes -= self._items.pop(key)[1]
        self._items[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, old) = self._items.popitem(last=False)
            self.bytes -= old

    def close(self) -> None:
        """Drop every value and keep none from now on (the engine is shut down: what the cache held
        is freed as soon as the requests using it are done, even while the engine is still referenced;
        a `put` racing with this keeps nothing, as the budget is 0)."""
        self.max_bytes = 0
        self._items.clear()
        self.bytes = 0


class VideoTokenCache(_BoundedLRU):
    """Visual tokens ((N, D) tensors on the model's device) by `video_keys` key."""

    def put(self, key, tokens: torch.Tensor) -> None:
        """Keep `tokens`, counted as the bytes of the storage they keep alive (a view of a larger
        tensor holds all of it)."""
        super().put(key, tokens, tokens.untyped_storage().nbytes())


class PrefixCache(_BoundedLRU):
    """KV caches of earlier requests, each with the token ids it holds and its videos' keys.

    `take(ids, keys)` finds the entry of the same videos whose ids give `ids` the longest reusable
    start (`storm_vlm.model.kv_cache.reusable_start`) and returns a copy of that entry's cache cut
    to it, or None. Entries stay for other requests (a regenerated answer, another
    branch of the conversation), except one that starts a newer entry of the same videos (the
    previous turn of a conversation): the newer one gives every request at least as much. Only
    caches of whole-sequence layers (`GrowingKVLayer`, what the model creates) are kept: a
    sliding-window cache cannot be cut back.
    """

    def __init__(self, max_bytes: int, text_config, placeholder_ids: set[int]):
        super().__init__(max_bytes)
        self._config = text_config
        self._placeholders = set(placeholder_ids)

    def take(self, ids: list[int], keys: list[tuple]) -> tuple[StormKVCache | None, int]:
        """(a copy of the best entry's cache cut to its shared start, that length) or (None, 0).
        ids: the request's prompt ids; keys: its videos' keys, in order (`reusable_start`)."""
        best, best_len = None, 0
        for entry_ids, entry_keys in self._items:
            shared = reusable_start(ids, entry_ids, self._placeholders) if list(entry_keys) == list(keys) else 0
            if shared > best_len:
                best, best_len = (entry_ids, entry_keys), shared
        if best is None:
            return None, 0
        cache = self.get(best)
        copy = StormKVCache(config=self._config)
        for i, layer in enumerate(cache.layers):
            copy.update(layer.keys[:, :, :best_len], layer.values[:, :, :best_len], i)
        return copy, best_len

    def put(self, ids: list[int], keys: list[tuple], cache) -> None:
        """Keep `cache` (one row) as holding `ids` (its first cache.get_seq_length() tokens), counted
        as the bytes of its key and value buffers (spare room included). The decode step's transposed
        copy of the keys (as large again) is dropped: `take` copies only keys and values."""
        if (not isinstance(cache, StormKVCache) or not all(type(layer) is GrowingKVLayer for layer in cache.layers)
                or cache.layers[0].keys.shape[0] != 1):
            return
        length = cache.get_seq_length()
        for layer in cache.layers:
            layer.drop_transposed_keys()
        size = sum(t.untyped_storage().nbytes() for layer in cache.layers for t in (layer.keys, layer.values))
        key = (tuple(ids[:length]), tuple(keys))
        super().put(key, cache, size)
        if key in self._items:  # an entry of the same videos that starts this one can give no request more
            for old in [k for k in self._items if k != key and k[1] == key[1] and key[0][:len(k[0])] == k[0]]:
                self.bytes -= self._items.pop(old)[1]
