"""A faster BabyAI expert: minigrid's bot with its hot paths replaced, every decision the same.

Profiled (cProfile, 50 BossLevel episodes), ~75% of an episode with minigrid's bot is its
``replan``: over half of that its breadth-first searches (a list used as a FIFO queue and
sliced at every pop; ~1.8 searches a step, each from scratch although agent, grid and
memory do not change within a step), a third its visibility update (it rebuilds, rotates
and re-occludes the agent's 7x7 view, which the environment has just computed for the
observation), ~5% refreshing every subgoal's copy of the agent's state. ``FastBot`` keeps
minigrid's subgoals and planning logic (it subclasses ``BabyAIBot``) and replaces only:

- ``_process_obs``: the seen cells are read off the observation image (the environment
  encodes every cell it did not see as "unseen", type 0).
- ``_shortest_path``: one search per step and mode (around / through blockers), shared by
  every query of that step and grown only as far as the queries need. It reaches cells in
  exactly the order of minigrid's search (first in, first out; a cell keeps the parent
  and heading it was first reached with; neighbours ahead first), so the first accepted
  cell and its path are the same. The two tests minigrid asks most ("is this the target",
  "is this unseen") are recognised and answered by lookup instead of cell by cell.
- ``_refresh_subgoals`` (the hook tc.thoughts' traced ``replan`` calls): the agent's state
  is computed once a step and given to every subgoal.

``tc.thoughts.ThoughtBot(env, bot="fast")`` runs it with thoughts; ``tc.thoughts.CheckedBot``
runs both bots side by side and fails at the first step where they differ.
"""

from __future__ import annotations

import functools
from collections import deque

import numpy as np
from minigrid.core.constants import DIR_TO_VEC
from minigrid.utils.baby_ai_bot import BabyAIBot


def _turn_order(d: int) -> list[tuple[int, int, int]]:
    """Neighbours (dx, dy, heading there) in the order minigrid's search queues them for heading ``d``.

    Ahead first, then the two sides, then behind: moving straight on is slightly preferred.
    """
    di, dj = (int(v) for v in DIR_TO_VEC[d])
    vecs = [(di, dj), (dj, di), (-dj, -di), (-di, -dj)]
    return [(k, l, next(h for h, v in enumerate(DIR_TO_VEC) if tuple(v) == (k, l))) for k, l in vecs]


_TURN_ORDER = [_turn_order(d) for d in range(4)]


@functools.lru_cache(maxsize=None)
def view_cells(width: int, height: int, size: int, x: int, y: int, d: int) -> tuple[int, ...]:
    """The flat world cell (y * width + x) of every view cell, -1 outside the grid.

    In the image's order (view cell (i, j) at index i * size + j). The agent at (x, y)
    heading ``d`` stands at view cell (size // 2, size - 1), facing up: view cell (i, j)
    lies (size - 1 - j) cells ahead of it and (i - size // 2) to its right.
    """
    (fx, fy), (rx, ry) = (int(v) for v in DIR_TO_VEC[d]), (-int(DIR_TO_VEC[d][1]), int(DIR_TO_VEC[d][0]))
    cells = []
    for i in range(size):
        for j in range(size):
            ahead, right = size - 1 - j, i - size // 2
            wx, wy = x + fx * ahead + rx * right, y + fy * ahead + ry * right
            cells.append(wy * width + wx if 0 <= wx < width and 0 <= wy < height else -1)
    return tuple(cells)


def _code(make) -> bytes:
    return make(None).__code__.co_code


# Acceptance tests that minigrid's subgoals pass to _shortest_path, recognised by their
# bytecode (the same code whatever the variable is named) and answered without calling
# them cell by cell: "is the cell this target" (going next to something, finding an
# object) and "is the cell unseen" (exploring). Any other test is called cell by cell.
_IS_TARGET = _code(lambda target: lambda pos, cell: pos == target)
_IS_UNSEEN = _code(lambda self: lambda pos, cell: not self.bot.vis_mask[pos])
_UNSEEN_NAMES = ("bot", "vis_mask")


def _target_cell(accept_fn, bot: FastBot) -> int | None:
    """The flat cell that ``accept_fn`` tests for if it is "pos == target" with an in-grid target."""
    code, closure = accept_fn.__code__, accept_fn.__closure__
    if code.co_code != _IS_TARGET or code.co_argcount != 2 or closure is None or len(closure) != 1:
        return None
    target = closure[0].cell_contents
    # Anything but a pair of in-grid integers compares unequal to every cell (or raises):
    # leave that to the cell-by-cell test.
    if type(target) is not tuple or len(target) != 2 or not all(isinstance(v, (int, np.integer)) for v in target):
        return None
    x, y = int(target[0]), int(target[1])
    return y * bot._width + x if 0 <= x < bot._width and 0 <= y < bot._height else None


def _tests_unseen(accept_fn, bot: FastBot) -> bool:
    """Whether ``accept_fn`` is "not bot.vis_mask[pos]" for this bot."""
    code, closure = accept_fn.__code__, accept_fn.__closure__
    return (code.co_code == _IS_UNSEEN and code.co_names == _UNSEEN_NAMES and code.co_argcount == 2
            and closure is not None and len(closure) == 1 and getattr(closure[0].cell_contents, "bot", None) is bot)


class BotMismatch(AssertionError):
    """The fast path (bot or observation) and minigrid's disagreed at some step."""


class _Search:
    """A breadth-first search from fixed start cells, grown on demand (see ``FastBot._first``)."""

    __slots__ = ("order", "parent", "queue", "through_blockers")

    def __init__(self, starts: list[tuple[int, int]], through_blockers: bool):
        self.order = [p for p, _ in starts]            # cells (flat j * width + i) in the order reached
        self.parent = dict.fromkeys(self.order, -1)    # cell -> cell it was reached from (-1: a start)
        self.queue = deque(starts)                     # (cell, heading) still to expand
        self.through_blockers = through_blockers


class FastBot(BabyAIBot):
    """``BabyAIBot`` with faster, decision-for-decision identical searches and memory updates.

    Set ``image`` to the current observation's image before each ``replan`` to spare the
    bot recomputing the agent's view (it is used once, then cleared).
    """

    def __init__(self, env):
        # The bare environment, not its gymnasium wrappers: the subgoals read
        # ``bot.mission.unwrapped`` several times a step, through every wrapper.
        super().__init__(env.unwrapped)
        u = env.unwrapped
        self.image: np.ndarray | None = None
        self._width, self._height = u.width, u.height
        # vis_mask stays minigrid's [width, height] boolean array (subgoals index it), as a
        # view of a flat row-major copy that the searches read without numpy indexing.
        self._seen = np.zeros(u.width * u.height, dtype=bool)
        self.vis_mask = self._seen.reshape(u.height, u.width).T
        self._xy = [(p % u.width, p // u.width) for p in range(u.width * u.height)]
        self._moves = [[(dx + dy * u.width, h) for dx, dy, h in _TURN_ORDER[d]] for d in range(4)]
        self._vis = [False] * (u.width * u.height)  # the same memory as a list, for the searches
        self._searches: dict[bool, _Search] = {}

    def _process_obs(self):
        u = self.mission
        image = u.gen_obs()["image"] if self.image is None else self.image
        self.image = None
        x, y = u.agent_pos
        world = view_cells(u.width, u.height, u.agent_view_size, int(x), int(y), u.agent_dir)
        seen = [w for w, kind in zip(world, image[:, :, 0].ravel().tolist()) if kind != 0 and w >= 0]
        self._seen[seen] = True
        for p in seen:
            self._vis[p] = True
        # A new step: the agent, grid or memory may have changed, so searches start afresh.
        self._searches.clear()
        self._cells = u.grid.grid

    def _refresh_subgoals(self):
        """``update_agent_attributes`` of every subgoal on the stack (called at each step).

        Every subgoal gets the same values (all read off the agent), so they are computed
        once; nothing changes the arrays in place, so sharing them is safe.
        """
        u = self.mission
        pos, dir_vec = u.agent_pos, u.dir_vec
        fwd_pos = pos + dir_vec
        attributes = {"pos": pos, "dir_vec": dir_vec, "right_vec": u.right_vec, "fwd_pos": fwd_pos,
                      "fwd_cell": u.grid.get(*fwd_pos), "carrying": u.carrying}
        for subgoal in self.stack:
            subgoal.__dict__.update(attributes)

    def _search(self, through_blockers: bool) -> _Search:
        search = self._searches.get(through_blockers)
        if search is None:
            if through_blockers:
                # minigrid's second search starts from every cell the first one reached, heading right.
                first = self._searches[False]
                starts = [(p, 0) for p in first.order]
            else:
                u = self.mission
                starts = [(u.agent_pos[1] * self._width + u.agent_pos[0], u.agent_dir)]
            search = self._searches[through_blockers] = _Search(starts, through_blockers)
        return search

    def _grow(self, search: _Search, until_cell: int = -1, until_size: int = 0) -> None:
        """Expand queued cells of ``search`` (as minigrid's search would) until ``until_cell``
        has been reached or more than ``until_size`` cells have, or the queue is empty.

        BabyAI grids are walled all round, so expanded cells are never on the border and
        ``cell + offset`` never wraps to another row.
        """
        parent, order, queue = search.parent, search.order, search.queue
        vis, cells, moves, through_blockers = self._vis, self._cells, self._moves, search.through_blockers
        while queue and until_cell not in parent and len(order) <= until_size:
            p, d = queue.popleft()
            if not vis[p]:
                continue  # cells not seen yet are reached but never walked through
            cell = cells[p]
            if cell is not None:
                kind = cell.type
                if kind == "wall" or (kind == "door" and not cell.is_open):
                    continue
                if kind != "door" and not through_blockers:
                    continue
            for step, h in moves[d]:
                n = p + step
                if n not in parent:
                    parent[n] = p
                    order.append(n)
                    queue.append((n, h))

    def _first(self, search: _Search, accept_fn) -> int | None:
        """The first cell of ``search`` for which ``accept_fn(pos, cell)`` holds, growing it as needed."""
        order, parent = search.order, search.parent
        target = _target_cell(accept_fn, self)
        if target is not None:  # the only cell it accepts: the first one if it is ever reached
            self._grow(search, until_cell=target, until_size=len(self._cells))
            return target if target in parent else None
        unseen = _tests_unseen(accept_fn, self)
        vis, cells, xy = self._vis, self._cells, self._xy
        k = 0
        while True:
            if k >= len(order):
                self._grow(search, until_size=k)
                if k >= len(order):
                    return None
            p = order[k]
            if (not vis[p]) if unseen else accept_fn(xy[p], cells[p]):
                return p
            k += 1

    def _chain(self, search: _Search, p: int) -> list[int]:
        """Cells from ``p`` back to the start cell of ``search`` it was reached from (both included)."""
        chain = []
        while p != -1:
            chain.append(p)
            p = search.parent[p]
        return chain

    def _shortest_path(self, accept_fn, try_with_blockers=False):
        # Same contract as BabyAIBot._shortest_path: (path without the start cell, or None;
        # the accepted cell; whether blockers were allowed on the path).
        first = self._search(False)
        p = self._first(first, accept_fn)
        with_blockers = False
        if p is not None:
            chain = self._chain(first, p)
        elif try_with_blockers:
            with_blockers = True
            second = self._search(True)
            p = self._first(second, accept_fn)
            if p is None:
                return None, None, True
            # The second search starts from cells the first one reached: continue back through it.
            chain = self._chain(second, p)
            chain += self._chain(first, chain[-1])[1:]
        else:
            return None, None, False
        return [self._xy[c] for c in reversed(chain[:-1])], self._xy[p], with_blockers
