"""Task families of the synthetic temporal-reasoning benchmark: rendering and checking.

Every video is a plain grey background, a light-grey distractor dot drifting across it
(unsaturated, so it never counts as an event), and the task's saturated coloured squares.
Each task renders (T, S, S, 3) uint8 frames from a random generator and the *fact* the
question asks about; a checker recovers that fact from decoded frames alone, using only
the scene conventions below (saturated pixels are events, colours come from PALETTE).

Tasks (4 options each; the fact is chosen so that the answer letter is the one requested):
  transient  a big square flashes in exactly one frame, anywhere in time: which colour?
  order      two squares appear briefly one after the other: which colour came first?
  direction  a square leaves the centre, travels to an edge and returns: which way?
  count      a square blinks k times (k in 2..5), each blink lasting about T/64 frames
  static     control: a square of one colour stays put in every frame: which colour?
  flash_order  two squares flash in consecutive frames of one pooling window: which colour came first?
  step         a square fills one quadrant for two frames, then the next quadrant for two frames,
               all inside one pooling window: which way did it step?

flash_order and step live inside one window of WINDOW = 4 frames (windows start at frame 0, as
temporal pooling with k = 4 over every frame of the video groups them), and the scene holds
still in that window apart from the squares. The two answers' windows therefore hold the same
frames in another order, so averaging each window's per-frame features erases the answer
exactly; only a model that mixes information across time before the pooling can keep it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LETTERS = "ABCD"
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "magenta": (215, 60, 215),
    "cyan": (50, 210, 220),
}
COLOURS = list(PALETTE)
DIRECTIONS = ["left", "right", "up", "down"]
COUNTS = ["2", "3", "4", "5"]
TASKS = ("transient", "order", "direction", "count", "static", "flash_order", "step")
WINDOW = 4  # frames per temporal pooling window that flash_order and step are built around
MIN_FRAMES, MAX_FRAMES = 16, 512

QUESTIONS = {
    "transient": "A large coloured square flashes for a single frame. What colour was the flash?",
    "order": "Two coloured squares appear one after the other. Which colour appeared first?",
    "direction": "The coloured square leaves the centre, travels away and comes back. In which direction did it move?",
    "count": "A coloured square blinks on and off. How many times did it appear?",
    "static": "One coloured square stays in the same place for the whole video. What colour is it?",
    "flash_order": "Two coloured squares flash one right after the other. Which colour flashed first?",
    "step": "A coloured square appears briefly and jumps once. In which direction did it jump?",
}

_SATURATION = 80  # max(rgb) - min(rgb) above this marks an event pixel; the grey scene is ~0
_DISTRACTOR = (170, 170, 170)


@dataclass
class Rendered:
    """frames: (T, S, S, 3) uint8; options: 4 option texts; answer: letter of the true one."""

    frames: np.ndarray
    options: list[str]
    answer: str


# ------------------------------------------------------------------ drawing


def _even(x: float) -> int:
    return int(x) // 2 * 2  # even coordinates keep squares aligned with 4:2:0 chroma blocks


def _square(frame: np.ndarray, y: int, x: int, side: int, colour) -> None:
    frame[y:y + side, x:x + side] = colour


def _random_corner(rng, size: int, side: int) -> tuple[int, int]:
    """Top-left corner of a square of `side` fully inside a size x size frame, 2 px margin."""
    hi = size - side - 2
    return _even(rng.integers(2, hi + 1)), _even(rng.integers(2, hi + 1))


def _background(rng, num_frames: int, size: int) -> np.ndarray:
    """(T, S, S, 3): grey background with a light-grey dot drifting on a straight, bouncing path."""
    grey = int(rng.integers(30, 91))
    frames = np.full((num_frames, size, size, 3), grey, dtype=np.uint8)
    side = max(4, _even(size // 8))
    span = size - side
    pos = rng.uniform(0, span, size=2)
    vel = rng.uniform(-1, 1, size=2)
    vel *= (span / max(num_frames, 1)) * rng.uniform(1.0, 3.0) / max(np.abs(vel).max(), 1e-6)
    for t in range(num_frames):
        y, x = (_even(v) for v in pos)
        _square(frames[t], y, x, side, _DISTRACTOR)
        pos += vel
        for axis in range(2):  # bounce off the borders
            if pos[axis] < 0 or pos[axis] > span:
                vel[axis] = -vel[axis]
                pos[axis] = np.clip(pos[axis], 0, span)
    return frames


def _colour_options(rng, answer_letter: str, correct: str, must_include=()) -> list[str]:
    """4 distinct colour names: `correct` at the answer letter, `must_include` among the others."""
    others = [c for c in must_include if c != correct]
    pool = [c for c in COLOURS if c != correct and c not in others]
    others += [str(c) for c in rng.choice(pool, size=3 - len(others), replace=False)]
    others = [others[i] for i in rng.permutation(3)]
    slot = LETTERS.index(answer_letter)
    return others[:slot] + [correct] + others[slot:]


# ------------------------------------------------------------------ tasks


def render_transient(rng, num_frames: int, size: int, answer: str) -> Rendered:
    frames = _background(rng, num_frames, size)
    colour = str(rng.choice(COLOURS))
    side = _even(size // 2)
    y, x = _random_corner(rng, size, side)
    t = int(rng.integers(num_frames))  # anywhere in time: 8x subsampling misses it 7 times in 8
    _square(frames[t], y, x, side, PALETTE[colour])
    return Rendered(frames, _colour_options(rng, answer, colour), answer)


def render_order(rng, num_frames: int, size: int, answer: str) -> Rendered:
    frames = _background(rng, num_frames, size)
    first, second = (str(c) for c in rng.choice(COLOURS, size=2, replace=False))
    length = max(1, num_frames // 32)
    gap = 1
    # two sorted start times with at least `gap` empty frames between the events
    x1, x2 = np.sort(rng.integers(0, num_frames - 2 * length - gap + 1, size=2))
    starts = (int(x1), int(x2) + length + gap)
    side = _even(size // 4)
    for colour, start in zip((first, second), starts):
        y, x = _random_corner(rng, size, side)
        for t in range(start, start + length):
            _square(frames[t], y, x, side, PALETTE[colour])
    return Rendered(frames, _colour_options(rng, answer, first, must_include=(second,)), answer)


def render_direction(rng, num_frames: int, size: int, answer: str) -> Rendered:
    frames = _background(rng, num_frames, size)
    direction = DIRECTIONS[LETTERS.index(answer)]
    colour = PALETTE[str(rng.choice(COLOURS))]
    side = max(4, _even(size // 6))
    centre = _even((size - side) / 2)
    reach = centre - 2  # travel to 2 px from the edge
    width = int(rng.integers(max(2, num_frames // 4), num_frames // 2 + 1))
    start = int(rng.integers(0, num_frames - width + 1))
    dy, dx = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}[direction]
    for t in range(num_frames):
        phase = (t - start) / max(width - 1, 1)
        frac = 1.0 - abs(2.0 * phase - 1.0) if 0.0 <= phase <= 1.0 else 0.0  # 0 -> 1 -> 0
        offset = _even(reach * frac)
        _square(frames[t], centre + dy * offset, centre + dx * offset, side, colour)
    return Rendered(frames, list(DIRECTIONS), answer)


def render_count(rng, num_frames: int, size: int, answer: str) -> Rendered:
    frames = _background(rng, num_frames, size)
    k = int(COUNTS[LETTERS.index(answer)])
    colour = PALETTE[str(rng.choice(COLOURS))]
    blink = max(1, num_frames // 64)
    min_gap = max(2, blink)
    slack = num_frames - (k * blink + (k - 1) * min_gap)
    extra = rng.multinomial(slack, np.full(k + 1, 1.0 / (k + 1)))  # spread the spare frames
    side = _even(size // 4)
    y, x = _random_corner(rng, size, side)
    t = int(extra[0])
    for i in range(k):
        for u in range(t, t + blink):
            _square(frames[u], y, x, side, colour)
        t += blink + min_gap + int(extra[i + 1])
    return Rendered(frames, list(COUNTS), answer)


def render_static(rng, num_frames: int, size: int, answer: str) -> Rendered:
    frames = _background(rng, num_frames, size)
    colour = str(rng.choice(COLOURS))
    side = _even(size // 4)
    y, x = _random_corner(rng, size, side)
    frames[:, y:y + side, x:x + side] = PALETTE[colour]
    return Rendered(frames, _colour_options(rng, answer, colour), answer)


def _window_start(rng, num_frames: int) -> int:
    """First frame of a random whole pooling window."""
    return WINDOW * int(rng.integers(num_frames // WINDOW))


def _hold_still(frames: np.ndarray, start: int, stop: int) -> None:
    """Freeze the scene (the drifting dot) over frames[start:stop] at frames[start]."""
    frames[start + 1:stop] = frames[start]


def render_flash_order(rng, num_frames: int, size: int, answer: str) -> Rendered:
    frames = _background(rng, num_frames, size)
    first, second = (str(c) for c in rng.choice(COLOURS, size=2, replace=False))
    t = _window_start(rng, num_frames) + int(rng.integers(WINDOW - 1))  # t and t + 1 share a window
    _hold_still(frames, t, t + 2)
    side = _even(size // 2)
    for colour, u in ((first, t), (second, t + 1)):
        y, x = _random_corner(rng, size, side)
        _square(frames[u], y, x, side, PALETTE[colour])
    return Rendered(frames, _colour_options(rng, answer, first, must_include=(second,)), answer)


def render_step(rng, num_frames: int, size: int, answer: str) -> Rendered:
    frames = _background(rng, num_frames, size)
    direction = DIRECTIONS[LETTERS.index(answer)]
    colour = PALETTE[str(rng.choice(COLOURS))]
    # the square fills one quadrant and steps to the next one: quadrant-aligned, so each position
    # is one spatial token after the 2x2 pixel shuffle of a 4 x 4 patch grid
    side = size // 2
    (y0, x0), (y1, x1) = _step_quadrants(rng, direction)
    start = _window_start(rng, num_frames)
    _hold_still(frames, start, start + WINDOW)
    for u in range(start, start + WINDOW):
        y, x = (y1, x1) if u >= start + WINDOW // 2 else (y0, x0)
        _square(frames[u], y * side, x * side, side, colour)
    return Rendered(frames, list(DIRECTIONS), answer)


def _step_quadrants(rng, direction: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """(row, column) quadrants before and after a step in `direction`; the other axis is random."""
    other = int(rng.integers(2))
    if direction in ("left", "right"):
        x0 = 1 if direction == "left" else 0
        return (other, x0), (other, 1 - x0)
    y0 = 1 if direction == "up" else 0
    return (y0, other), (1 - y0, other)


RENDERERS = {"transient": render_transient, "order": render_order, "direction": render_direction,
             "count": render_count, "static": render_static, "flash_order": render_flash_order,
             "step": render_step}


# ------------------------------------------------------------------ checking


def _event_mask(frames: np.ndarray) -> np.ndarray:
    """(T, H, W) bool: saturated pixels (the coloured squares, never the grey scene)."""
    r, g, b = frames[..., 0], frames[..., 1], frames[..., 2]
    # elementwise max/min of the three planes: a reduction over a length-3 axis is ~10x slower
    return (np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)) > _SATURATION


def _colour_name(pixels: np.ndarray) -> str:
    """Nearest palette colour to the median of (P, 3) pixels."""
    median = np.median(pixels.reshape(-1, 3).astype(np.float32), axis=0)
    names = list(PALETTE)
    dist = [np.sum((median - np.array(PALETTE[n], np.float32)) ** 2) for n in names]
    return names[int(np.argmin(dist))]


def recover_fact(frames: np.ndarray, task: str) -> str | None:
    """Recompute the answer text of `task` from decoded (T, H, W, 3) frames (None if unreadable)."""
    num_frames, size = frames.shape[0], frames.shape[1]
    mask = _event_mask(frames)
    counts = mask.reshape(num_frames, -1).sum(axis=1)  # (T,)
    if task in ("transient", "order", "count", "static", "flash_order"):
        big = {"transient": size // 2, "order": size // 4, "count": size // 4, "static": size // 4,
               "flash_order": size // 2}[task]
        on = counts > 0.5 * _even(big) ** 2
        if task == "transient":
            hits = np.flatnonzero(on)
            return _colour_name(frames[hits[0]][mask[hits[0]]]) if len(hits) == 1 else None
        if task == "static":
            if not on.all():
                return None
            return _colour_name(frames[mask])
        if task == "count":
            return str(int(np.sum(on[1:] & ~on[:-1]) + on[0]))
        if task == "flash_order":
            hits = np.flatnonzero(on)
            if len(hits) != 2 or hits[1] != hits[0] + 1 or hits[0] // WINDOW != hits[1] // WINDOW:
                return None
            return _colour_name(frames[hits[0]][mask[hits[0]]])
        seen = []  # order: colours in order of first appearance
        for t in np.flatnonzero(on):
            name = _colour_name(frames[t][mask[t]])
            if name not in seen:
                seen.append(name)
        return seen[0] if len(seen) == 2 else None
    if task == "step":
        on = np.flatnonzero(counts > 0.5 * (size // 2) ** 2)
        if len(on) != WINDOW or on[0] % WINDOW or on[-1] != on[0] + WINDOW - 1:
            return None
        ys, xs = np.indices((size, size))
        (y0, x0), (y1, x1) = ((ys[mask[t]].mean(), xs[mask[t]].mean()) for t in (on[0], on[-1]))
        if abs(x1 - x0) >= abs(y1 - y0):
            return "right" if x1 > x0 else "left"
        return "down" if y1 > y0 else "up"
    if task == "direction":
        if not (counts > 0).all():
            return None
        ys, xs = np.indices((size, size))
        cy = (mask * ys).reshape(num_frames, -1).sum(1) / counts
        cx = (mask * xs).reshape(num_frames, -1).sum(1) / counts
        dy, dx = cy - cy[0], cx - cx[0]
        t = int(np.argmax(np.maximum(np.abs(dy), np.abs(dx))))
        if max(abs(dy[t]), abs(dx[t])) < size / 8:
            return None
        if abs(dx[t]) >= abs(dy[t]):
            return "right" if dx[t] > 0 else "left"
        return "down" if dy[t] > 0 else "up"
    raise ValueError(f"unknown task {task!r}")


def recover_answer(frames: np.ndarray, task: str, options: list[str]) -> str | None:
    """The letter of the option matching what the frames show, or None."""
    fact = recover_fact(frames, task)
    texts = [o.split(". ", 1)[1] if o[:1] in LETTERS and o[1:3] == ". " else o for o in options]
    return LETTERS[texts.index(fact)] if fact in texts else None
