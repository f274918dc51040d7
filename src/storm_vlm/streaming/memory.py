"""What a stream keeps of its past when its visual tokens reach the budget: the memory policies.

A stream holds its pooled frames in order (oldest first), each N' tokens. When there are more
than `budget` of them, a policy picks the ones to keep. Each policy frees a good share of the
budget at once, because every change of the kept set means re-running the LLM prefill over it
(the kept tokens move to new positions): a rebuild happens once per about a quarter of the
budget of new tokens ("resample", "window") or half of it ("uniform"), not at every chunk.

- "resample" (default): keep every 2nd pooled frame of the oldest half. Test-time temporal
  sampling (the paper's own operation) applied to the past, again each time the budget is
  reached: the recent half stays dense, and the older a part of the video, the more rounds it has
  been among the oldest half, so the sparser it is kept (the very first frame always stays). With
  the causal projector every token also carries the Mamba state of all frames before it, so a
  dropped frame is not entirely forgotten.
- "uniform": keep every 2nd pooled frame of the whole past, counted from the newest: a global
  sampling stride that doubles each time the budget is reached, so the past is kept at one density,
  as a one-shot pass at a larger stride would (frames since the last time stay denser until the next).
- "window": drop the oldest frames, keeping the most recent three quarters of the budget (a
  sliding window; older frames survive only through the state carried in later tokens).

Pure functions of counts (no tensors), so the selection is easy to test and to reason about.
"""

from __future__ import annotations

from storm_vlm.errors import StormError

__all__ = ["MEMORY_POLICIES", "DEFAULT_POLICY", "check_policy", "select_kept"]

MEMORY_POLICIES = ("resample", "uniform", "window")
DEFAULT_POLICY = "resample"
WINDOW_KEEP = 0.75  # "window" keeps this share of the budget after dropping


def check_policy(policy: str) -> str:
    if policy not in MEMORY_POLICIES:
        raise StormError(f"memory policy must be one of {', '.join(MEMORY_POLICIES)}, got {policy!r}")
    return policy


def select_kept(count: int, budget: int, policy: str = DEFAULT_POLICY) -> list[int]:
    """Positions (0 = oldest) of the `count` pooled frames to keep so that at most `budget` remain.

    Returns every position when `count <= budget`. `budget` >= 1 pooled frames. The newest frame is
    always kept (it is what a question about "now" needs).
    """
    check_policy(policy)
    if budget < 1:
        raise StormError(f"the memory budget must hold at least one pooled frame, got {budget}")
    kept = list(range(count))
    if count <= budget:
        return kept
    if policy == "window":
        return kept[count - max(1, int(budget * WINDOW_KEEP)):]
    while len(kept) > budget:
        if policy == "uniform":
            # every 2nd frame counted from the newest, so the newest is kept
            thinned = kept[::-1][::2][::-1]
        else:
            half = (len(kept) + 1) // 2
            thinned = kept[:half][::2] + kept[half:]
        if len(thinned) == len(kept):  # nothing left to thin (a budget of one frame): keep the newest
            thinned = kept[-budget:]
        kept = thinned
    return kept
