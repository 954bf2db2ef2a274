"""The agent's observation computed faster, byte for byte the image of minigrid's ``gen_obs``.

Profiled (cProfile, 60 BossLevel episodes with the fast bot), ~45% of a demo episode was
the environment computing its observation: minigrid builds the agent's view as ``Grid``
objects (a slice with a new ``Wall`` for every cell outside the grid, then up to four
rotations, each a new grid, then occlusion and encoding, all through ``Grid.get/set``).
``observe`` reads the view's cells straight off the world grid with a cached cell map,
occludes them in the view's own coordinates as minigrid does, and encodes the visible ones
with the objects' own ``encode``.

``install(env)`` makes an environment use it (``reset`` and ``step`` call ``gen_obs``);
``install(env, check=True)`` keeps minigrid's and compares the two at every call.
"""

from __future__ import annotations

import functools

import numpy as np
from minigrid.core.constants import OBJECT_TO_IDX
from minigrid.core.world_object import Wall

from tc.fastbot import BotMismatch, view_cells

# What minigrid's view has outside the grid: an opaque wall (its slice makes a new one per cell).
_OUTSIDE = Wall()
_EMPTY = (OBJECT_TO_IDX["empty"], 0, 0)
_UNSEEN = (OBJECT_TO_IDX["unseen"], 0, 0)


def _visible(view: list, size: int) -> list[bool]:
    """Which view cells the agent sees: minigrid's ``Grid.process_vis`` on the flat view.

    Row by row from the agent's row away from it, sight spreads sideways and one row
    further from every seen cell that can be seen through, first rightwards then
    leftwards. The sweep order decides what is seen, so it is minigrid's exactly.
    """
    mask = [False] * (size * size)
    mask[(size // 2) * size + size - 1] = True
    for j in range(size - 1, -1, -1):
        for i in range(size - 1):
            k = i * size + j
            if mask[k] and (view[k] is None or view[k].see_behind()):
                mask[k + size] = True  # (i + 1, j)
                if j > 0:
                    mask[k + size - 1] = mask[k - 1] = True  # (i + 1, j - 1), (i, j - 1)
        for i in range(size - 1, 0, -1):
            k = i * size + j
            if mask[k] and (view[k] is None or view[k].see_behind()):
                mask[k - size] = True  # (i - 1, j)
                if j > 0:
                    mask[k - size - 1] = mask[k - 1] = True  # (i - 1, j - 1), (i, j - 1)
    return mask


def observe(env) -> dict:
    """``env.gen_obs()`` (an unwrapped minigrid env that does not see through walls), faster."""
    size, cells = env.agent_view_size, env.grid.grid
    x, y = env.agent_pos
    view = [cells[w] if w >= 0 else _OUTSIDE
            for w in view_cells(env.width, env.height, size, int(x), int(y), env.agent_dir)]
    mask = _visible(view, size)
    # The agent sees what it carries where it stands (after occlusion, as in minigrid).
    view[(size // 2) * size + size - 1] = env.carrying or None
    codes = []
    for seen, cell in zip(mask, view):
        codes.extend(_UNSEEN if not seen else _EMPTY if cell is None else cell.encode())
    image = np.array(codes, dtype=np.uint8).reshape(size, size, 3)
    return {"image": image, "direction": env.agent_dir, "mission": env.mission}


def _checked(env) -> dict:
    """minigrid's observation, after checking that ``observe`` gives the same image."""
    obs = type(env).gen_obs(env)
    if not np.array_equal(observe(env)["image"], obs["image"]):
        raise BotMismatch(f"after {env.step_count} steps: the fast observation differs from minigrid's")
    return obs


def install(env, check: bool = False) -> None:
    """Make ``env`` compute its observations with ``observe`` (``check``: compare them with minigrid's).

    Environments that see through walls keep minigrid's (``observe`` always occludes).
    """
    u = env.unwrapped
    if not u.see_through_walls:
        u.gen_obs = functools.partial(_checked if check else observe, u)
