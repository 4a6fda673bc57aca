"""Text Overcooked (paper Sec. 4.1 and App. 9.1): the Tomato and Salad tasks of TWOSOME (Tan et al., 2024).

One agent in a 7x7 kitchen (TWOSOME's map "A") must serve a bowl holding exactly the chopped recipe foods:
chopped tomato (``task="tomato"``) or chopped tomato and lettuce (``task="salad"``, with an onion as a
distractor and two cutting boards). One ``step`` is one macro action ("pick up the tomato", "walk to the
first cutting board", ...), which runs primitive moves (right/down/left/up/stay) until it completes; the
reward is ``sum_t 0.99**t r_t`` over its primitive steps (the discount restarts every macro) and
``info["primitive_steps"]`` says how many it took. Per primitive step: -0.001; +0.2 when a recipe food
becomes chopped (3 knife strokes); +1 and termination for delivering exactly the recipe.

The facts, texts and reference numbers are those of ``/work/shared/specs/overcooked.md``, measured on
TWOSOME's ``Overcooked-LLMA-v4`` (Tomato) and ``-v3`` (Salad) with its ``obs2text`` renderer. Quirks of the
original that are kept on purpose, because they shape what an agent learns:

- A wrong delivery (wrong contents, an empty bowl, or food without a bowl) gives -0.1 and is not terminal:
  what was delivered (the bowl and the foods in it, or the lone food) goes back to its initial counter,
  unchopped. The +0.2 chopping bonus can therefore be earned again.
- The agent sees items within a radius of 2 (Chebyshev); the text mentions only seen items (a chopped
  tomato left on the board is not mentioned once the agent walks to the bowl). Navigation goes to the
  remembered position of an item: the last position seen, or its initial one if never seen or if the
  remembered spot is in view and empty. With one agent, items move only in its view or by a wrong
  delivery made in its view, so the memory never misleads it; it is modelled all the same.
- "chop the X" stays on offer after X is chopped (a one-step no-op, like every macro with nothing to do).
- In Salad, "take the empty bowl" becomes "take the bowl" only while a bowl with contents is in view.

Deviations: the horizon (200 primitive steps) cuts a macro short, where TWOSOME finishes the macro past
200; in Tomato only (1, 1) counts as "in front of the cutting board" (TWOSOME's renderer also says so at
(2, 1), which only a horizon cut can leave the agent on, and crashes there with empty hands); paths are
BFS shortest paths with TWOSOME's neighbour order (right, left, down, up) rather than its A*, which gives
paths of the same length, hence the same step counts and rewards.

The env has no randomness: ``reset(seed=...)`` seeds ``np_random`` but every episode is the same.
The paper caps episodes at 31 (Tomato) and 51 (Salad) macro actions: ``max_macro_steps``.

    env = envs.make("overcooked-tomato")
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step("pick up the tomato")
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any

from envs.core import TextEnv

GAMMA = 0.99  # discount over the primitive steps of one macro action (TWOSOME's run loop)
STEP_PENALTY = -0.001
CHOP_BONUS = 0.2
DELIVERY_REWARD = 1.0
WRONG_DELIVERY = -0.1
CHOPS_NEEDED = 3
VIEW_RADIUS = 2
HORIZON = 200

Cell = tuple[int, int]
Move = tuple[int, int]
RIGHT, DOWN, LEFT, UP = (0, 1), (1, 0), (0, -1), (-1, 0)
_CHOP_ORDER = (RIGHT, DOWN, LEFT, UP)  # TWOSOME's primitive-action order, scanned for a board to chop on
_ROUTE_ORDER = (RIGHT, LEFT, DOWN, UP)  # TWOSOME's A* neighbour order, reused to break ties between paths

FOODS = ("tomato", "lettuce", "onion")
_ARTICLE = {"tomato": "a tomato", "lettuce": "a lettuce", "onion": "an onion", "bowl": "a bowl"}
# Map codes: 0 floor, 1 counter, 2 agent, 3 tomato, 4 lettuce, 5 bowl, 6 cutting board, 7 delivery, 8 onion.
_ITEM_CODES = {"3": "tomato", "4": "lettuce", "5": "bowl", "8": "onion"}
_MAPS = {
    "tomato": (
        "1 1 1 1 1 3 1",
        "6 0 0 0 2 0 1",
        "1 0 0 0 0 0 1",
        "7 0 0 0 0 0 1",
        "1 0 0 0 0 0 1",
        "1 0 0 0 0 0 1",
        "1 1 1 1 1 5 1",
    ),
    "salad": (
        "1 1 1 1 1 3 1",
        "6 0 0 0 2 0 4",
        "6 0 0 0 0 0 8",
        "7 0 0 0 0 0 1",
        "1 0 0 0 0 0 1",
        "1 0 0 0 0 0 1",
        "1 1 1 1 1 5 1",
    ),
}
_RECIPES = {"tomato": ("tomato",), "salad": ("tomato", "lettuce")}
MACRO_CAPS = {"tomato": 31, "salad": 51}


def _add(cell: Cell, move: Move) -> Cell:
    return cell[0] + move[0], cell[1] + move[1]


def _distance(a: Cell, b: Cell) -> int:
    return abs(a[0] - b[0]) + abs(a[1] - b[1])


def _in_view(agent: Cell, cell: Cell) -> bool:
    return abs(agent[0] - cell[0]) <= VIEW_RADIUS and abs(agent[1] - cell[1]) <= VIEW_RADIUS


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


@dataclass
class World:
    """Everything that changes during an episode. A held item (and a held bowl's contents) sits on the
    agent's cell; an item on a board or in a bowl sits on that board's or bowl's cell."""

    agent: Cell
    holding: str | None
    pos: dict[str, Cell]
    chops: dict[str, int]
    in_bowl: frozenset[str]
    boards: list[str | None]
    memory: dict[str, Cell]

    def copy(self) -> World:
        return World(
            self.agent, self.holding, dict(self.pos), dict(self.chops), self.in_bowl, list(self.boards),
            dict(self.memory),
        )

    def key(self) -> tuple:
        return (
            self.agent,
            self.holding,
            tuple(self.pos.values()),
            tuple(self.chops.values()),
            tuple(sorted(self.in_bowl)),
            tuple(self.boards),
            tuple(self.memory.values()),
        )


class Kitchen:
    """One task's fixed layout and rules: primitive moves, macro actions and the text renderer."""

    def __init__(self, task: str) -> None:
        rows = [row.split() for row in _MAPS[task]]
        cells = {(r, c): code for r, row in enumerate(rows) for c, code in enumerate(row)}
        self.task = task
        self.height, self.width = len(rows), len(rows[0])
        self.floor = frozenset(cell for cell, code in cells.items() if code in "02")
        self.start = next(cell for cell, code in cells.items() if code == "2")
        self.board_cells = tuple(sorted(cell for cell, code in cells.items() if code == "6"))
        self.board_at = {cell: b for b, cell in enumerate(self.board_cells)}
        self.delivery = next(cell for cell, code in cells.items() if code == "7")
        self.initial = {_ITEM_CODES[code]: cell for cell, code in cells.items() if code in _ITEM_CODES}
        self.foods = tuple(f for f in FOODS if f in self.initial)
        # The renderer lists contents in this order, and the bowl last.
        self.items = self.foods + ("bowl",)
        self.recipe = frozenset(_RECIPES[task])
        self.fronts = tuple(_add(cell, RIGHT) for cell in self.board_cells)

        salad = len(self.board_cells) == 2
        if salad:
            self.board_names = ("the first cutting board", "the second cutting board")
            self.room_sentence = "There are two fixed cutting boards in the room."
            self.bowl_on_board = "A bowl containing chopped {} is on {}."
        else:
            self.board_names = ("the cutting board",)
            self.room_sentence = "There is a fixed cutting board in the room."
            self.bowl_on_board = "A bowl containing a chopped {} is on {}."
        recipe = [food for food in FOODS if food in self.recipe]
        self.task_sentence = f"Your task is to serve the dish of a bowl only containing chopped {_join(recipe)}."
        self.full_bowl_label = "take the bowl" if salad else None

        # Slot order of the admissible actions, and the macro action behind each slot.
        self.macros: tuple[tuple[str, Any], ...] = (
            tuple(("get", food) for food in self.foods)
            + (("get", "bowl"),)
            + tuple(("board", b) for b in range(len(self.board_cells)))
            + (("deliver", None), ("chop", None))
        )
        self.base_actions = (
            tuple(f"pick up the {food}" for food in self.foods)
            + ("take the empty bowl" if salad else "take the bowl",)
            + tuple(f"walk to {name}" for name in self.board_names)
            + ("serve nothing", "chop nothing")
        )
        self.bowl_slot = len(self.foods)
        self.board_slot = self.bowl_slot + 1
        self.deliver_slot = len(self.macros) - 2
        self.chop_slot = len(self.macros) - 1
        self._routes: dict[Cell, dict[Cell, int]] = {}

    def initial_world(self) -> World:
        return World(
            agent=self.start,
            holding=None,
            pos=dict(self.initial),
            chops={food: 0 for food in self.foods},
            in_bowl=frozenset(),
            boards=[None] * len(self.board_cells),
            memory=dict(self.initial),
        )

    # -- primitive moves ----------------------------------------------------------------------------
    @staticmethod
    def chopped(w: World, item: str | None) -> bool:
        return w.chops.get(item, 0) >= CHOPS_NEEDED

    @staticmethod
    def _place(w: World, item: str, cell: Cell) -> None:
        w.pos[item] = cell
        if item == "bowl":
            for food in w.in_bowl:
                w.pos[food] = cell

    def _primitive(self, w: World, move: Move | None) -> tuple[float, bool]:
        """One primitive step: a move, or an interaction with the counter, board or delivery it bumps into."""
        reward, success = STEP_PENALTY, False
        if move is not None:
            cell = _add(w.agent, move)
            if cell in self.floor:
                w.agent = cell
                if w.holding is not None:
                    self._place(w, w.holding, cell)
            elif cell in self.board_at:
                reward += self._use_board(w, self.board_at[cell])
            elif cell == self.delivery:
                if w.holding is not None:
                    bonus, success = self._deliver(w)
                    reward += bonus
            else:
                self._use_counter(w, cell)
        self._remember(w)
        return reward, success

    def _use_board(self, w: World, b: int) -> float:
        on_board, held = w.boards[b], w.holding
        if held is None:
            if on_board == "bowl" or self.chopped(w, on_board):
                w.boards[b], w.holding = None, on_board
                self._place(w, on_board, w.agent)
            elif on_board is not None:  # bumping into unchopped food is a knife stroke
                w.chops[on_board] += 1
                if w.chops[on_board] == CHOPS_NEEDED and on_board in self.recipe:
                    return CHOP_BONUS
        elif on_board is None:
            w.boards[b], w.holding = held, None
            self._place(w, held, self.board_cells[b])
        elif held == "bowl" and on_board != "bowl" and self.chopped(w, on_board):
            w.boards[b] = None
            w.in_bowl |= {on_board}
            self._place(w, "bowl", w.agent)
        elif on_board == "bowl" and self.chopped(w, held):
            w.boards[b], w.holding = None, "bowl"
            w.in_bowl |= {held}
            self._place(w, "bowl", w.agent)
        return 0.0

    def _use_counter(self, w: World, cell: Cell) -> None:
        # Macros only bump into a counter holding the item they go for, and food on a counter is never
        # chopped (a wrong delivery puts it back unchopped), so TWOSOME's moves that put the held item down
        # on a bare counter, or scoop chopped food from a counter into the held bowl, cannot happen here.
        item = next((i for i in self.items if w.pos[i] == cell and i not in w.in_bowl), None)
        if item is None:
            return
        if w.holding is None:
            w.holding = item
            self._place(w, item, w.agent)
        elif item == "bowl" and self.chopped(w, w.holding):  # the food goes into the bowl, which stays put
            w.in_bowl |= {w.holding}
            w.holding = None
            self._place(w, "bowl", cell)

    def _deliver(self, w: World) -> tuple[float, bool]:
        held, w.holding = w.holding, None
        if held == "bowl" and w.in_bowl == self.recipe:
            self._place(w, "bowl", self.delivery)
            return DELIVERY_REWARD, True
        returned = [held] + (sorted(w.in_bowl) if held == "bowl" else [])
        if held == "bowl":
            w.in_bowl = frozenset()
        for item in returned:
            w.pos[item] = self.initial[item]
            if item in w.chops:
                w.chops[item] = 0
        return WRONG_DELIVERY, False

    def _remember(self, w: World) -> None:
        for item in self.items:
            if _in_view(w.agent, w.pos[item]):
                w.memory[item] = w.pos[item]
            elif _in_view(w.agent, w.memory[item]):
                w.memory[item] = self.initial[item]

    # -- macro actions -------------------------------------------------------------------------------
    def _route(self, src: Cell, target: Cell) -> Move | None:
        """First move of a shortest floor path that ends by bumping into ``target``; None if unreachable."""
        if _distance(src, target) == 1:
            return target[0] - src[0], target[1] - src[1]
        if target not in self._routes:
            # BFS distances from the floor cells next to the target: paths never cross counters.
            seeds = [_add(target, m) for m in _ROUTE_ORDER if _add(target, m) in self.floor]
            dist, queue = {cell: 0 for cell in seeds}, deque(seeds)
            while queue:
                cell = queue.popleft()
                for m in _ROUTE_ORDER:
                    nxt = _add(cell, m)
                    if nxt in self.floor and nxt not in dist:
                        dist[nxt] = dist[cell] + 1
                        queue.append(nxt)
            self._routes[target] = dist
        dist = self._routes[target]
        if src not in dist:
            return None
        return next(m for m in _ROUTE_ORDER if dist.get(_add(src, m)) == dist[src] - 1)

    def _target(self, w: World, macro: tuple[str, Any]) -> Cell:
        kind, arg = macro
        if kind == "get":
            return w.memory[arg]
        return self.board_cells[arg] if kind == "board" else self.delivery

    def _next_primitive(self, w: World, macro: tuple[str, Any]) -> tuple[Move | None, bool]:
        """TWOSOME's per-step choice for the navigating macros: (move or None for stay, macro done)."""
        kind, arg = macro
        target = self._target(w, macro)
        if kind == "get" and arg != "bowl" and _in_view(w.agent, target) and w.pos["bowl"] == target:
            return None, True  # the food is already in the bowl
        if target == w.agent:
            return None, True  # already in hand
        move = self._route(w.agent, target)
        if move is None:
            return None, True
        if _distance(w.agent, target) != 1:
            return move, False
        # Next to the target: this move is the interaction and ends the macro, with these exceptions.
        if kind == "get" and arg == "bowl" and w.holding is not None:
            # Chopped food goes into the bowl and the macro goes on until the bowl is in hand.
            return (move, False) if self.chopped(w, w.holding) else (None, True)
        if kind == "board" and w.holding is None:
            return None, True
        if kind == "get" and self._unchopped_on(w, target):
            return None, True  # unchopped food on a board is not picked up
        return move, True

    def _ends_after_move(self, w: World, macro: tuple[str, Any]) -> bool:
        """TWOSOME's check after each step: stop next to the target instead of bumping into it."""
        kind, arg = macro
        target = self._target(w, macro)
        if _distance(w.agent, target) != 1:
            return False
        if kind in ("board", "deliver"):
            return w.holding is None
        board = self.board_at.get(target)
        return arg in self.foods and board is not None and w.boards[board] == arg and not self.chopped(w, arg)

    def _unchopped_on(self, w: World, cell: Cell) -> bool:
        board = self.board_at.get(cell)
        return board is not None and w.boards[board] in self.foods and not self.chopped(w, w.boards[board])

    def _chop_move(self, w: World) -> Move | None:
        return next((move for move in _CHOP_ORDER if self._unchopped_on(w, _add(w.agent, move))), None)

    def run_macro(self, w: World, slot: int, max_steps: int | None = None) -> tuple[float, int, bool]:
        """Run the macro in ``slot`` on ``w`` (in place): (discounted reward, primitive steps, success)."""
        macro = self.macros[slot]
        reward, discount, steps, strokes = 0.0, 1.0, 0, 0
        while max_steps is None or steps < max_steps:
            if macro[0] == "chop":
                move = self._chop_move(w)
                strokes += 1
                done = move is None or strokes >= CHOPS_NEEDED
            else:
                move, done = self._next_primitive(w, macro)
            step_reward, success = self._primitive(w, move)
            reward += discount * step_reward
            discount *= GAMMA
            steps += 1
            if success or done or self._ends_after_move(w, macro):
                break
        return reward, steps, success

    # -- text ----------------------------------------------------------------------------------------
    def describe(self, w: World) -> tuple[str, list[str]]:
        """TWOSOME's obs2text: the scene sentences (without the task sentence) and the admissible actions."""
        seen = {item: w.pos[item] for item in self.items if _in_view(w.agent, w.pos[item])}

        def items_at(cell: Cell) -> list[str]:
            return [item for item in self.items if seen.get(item) == cell]

        def state(food: str) -> str:
            return f"a chopped {food}" if self.chopped(w, food) else f"an unchopped {food}"

        sentences, actions = [self.room_sentence], list(self.base_actions)
        noticed = [_ARTICLE[item] for item in self.items if seen.get(item) == self.initial[item]]
        if len(noticed) == 1:
            sentences.append(f"You notice {noticed[0]} on the table.")
        elif noticed:
            sentences.append(f"You notice {_join(noticed)} on the different tables.")

        groups = []
        for b, cell in enumerate(self.board_cells):
            here, name = items_at(cell), self.board_names[b]
            groups.append(here)
            if here == ["bowl"]:
                sentences.append(f"A bowl is on {name}.")
            elif len(here) == 1:
                sentences.append(f"{state(here[0]).capitalize()} is on {name}.")
                if w.agent == self.fronts[b]:
                    actions[self.chop_slot] = f"chop the {here[0]}"
            elif here:
                sentences.append(self.bowl_on_board.format(_join(here[:-1]), name))

        held = items_at(w.agent)
        groups.append(held)
        if not held:
            thing = None
        elif held == ["bowl"]:
            thing = "a bowl"
        elif len(held) == 1:
            thing = state(held[0])
        else:
            thing = f"a bowl containing chopped {_join(held[:-1])}"
        if w.agent in self.fronts:
            where = f"Currently you are standing in front of {self.board_names[self.fronts.index(w.agent)]}"
            sentences.append(
                f"{where} without anything in hand." if thing is None else f"{where}, carrying {thing} in hand."
            )
        elif thing is None:
            sentences.append("Currently you don't have anything in hand.")
        elif len(held) > 1:
            sentences.append(f"Currently you are carrying {thing}.")  # TWOSOME drops "in hand" here
        else:
            sentences.append(f"Currently you are carrying {thing} in hand.")

        if held:
            actions[self.deliver_slot] = "serve the dish"
        if "bowl" in held:
            for k, food in enumerate(self.foods):
                actions[k] = f"put the {food} in the bowl"
            for b, name in enumerate(self.board_names):
                actions[self.board_slot + b] = f"put the bowl on {name}"
        elif held and not self.chopped(w, held[0]):
            for b, name in enumerate(self.board_names):
                actions[self.board_slot + b] = f"put the {held[0]} on {name}"
        if self.full_bowl_label and any(len(group) > 1 for group in groups):
            actions[self.bowl_slot] = self.full_bowl_label
        return " ".join(sentences), actions

    def render(self, w: World) -> str:
        """The grid: # counter, . floor, K board, D delivery, A agent; T/L/O/B an item off the agent
        (lower case when chopped; a bowl's contents are not shown)."""
        grid = [["." if (r, c) in self.floor else "#" for c in range(self.width)] for r in range(self.height)]
        for cell in self.board_cells:
            grid[cell[0]][cell[1]] = "K"
        grid[self.delivery[0]][self.delivery[1]] = "D"
        for item in self.items:
            cell = w.pos[item]
            if cell != w.agent and item not in w.in_bowl:
                letter = item[0].upper()
                grid[cell[0]][cell[1]] = letter.lower() if self.chopped(w, item) else letter
        grid[w.agent[0]][w.agent[1]] = "A"
        return "\n".join("".join(row) for row in grid)


class _Planner:
    """Fewest macro actions to a correct delivery from every state reachable from ``start``; ties go to the
    higher sum of macro rewards (the episodic return), then to the lower slot."""

    def __init__(self, kitchen: Kitchen) -> None:
        self.kitchen = kitchen
        self.best: dict[tuple, int | None] = {}

    def slot(self, w: World) -> int | None:
        key = w.key()
        if key not in self.best:
            self._solve(w)
        return self.best[key]

    def _solve(self, start: World) -> None:
        # Explore every state reachable by macro actions (success edges point to None).
        worlds, edges, queue = {start.key(): start}, {}, deque([start.key()])
        while queue:
            key = queue.popleft()
            out = []
            for slot in range(len(self.kitchen.macros)):
                w = worlds[key].copy()
                reward, _, success = self.kitchen.run_macro(w, slot)
                nxt = None if success else w.key()
                out.append((slot, reward, nxt))
                if nxt is not None and nxt not in worlds:
                    worlds[nxt] = w
                    queue.append(nxt)
            edges[key] = out
        # Macros to go, by BFS backwards from the successful deliveries.
        parents = defaultdict(set)
        for key, out in edges.items():
            for _, _, nxt in out:
                if nxt is not None:
                    parents[nxt].add(key)
        layer = [key for key, out in edges.items() if any(nxt is None for _, _, nxt in out)]
        togo = dict.fromkeys(layer, 1)
        layers = []
        while layer:
            layers.append(layer)
            nxt_layer = []
            for key in layer:
                for parent in parents[key]:
                    if parent not in togo:
                        togo[parent] = togo[key] + 1
                        nxt_layer.append(parent)
            layer = nxt_layer
        # Best return along the shortest plans, nearest layers first.
        value: dict[tuple, float] = {}
        for layer in layers:
            for key in layer:
                best_slot, best_value = None, float("-inf")
                for slot, reward, nxt in edges[key]:
                    if nxt is None and togo[key] == 1:
                        candidate = reward
                    elif nxt is not None and togo.get(nxt) == togo[key] - 1:
                        candidate = reward + value[nxt]
                    else:
                        continue
                    if candidate > best_value + 1e-12:  # float noise must not beat slot order
                        best_slot, best_value = slot, candidate
                value[key], self.best[key] = best_value, best_slot
        for key in edges:
            self.best.setdefault(key, None)


_KITCHENS = {task: Kitchen(task) for task in _MAPS}
_PLANNERS = {task: _Planner(kitchen) for task, kitchen in _KITCHENS.items()}


class OvercookedEnv(TextEnv):
    """``task="tomato"`` or ``"salad"``; ``max_macro_steps`` defaults to the paper's cap (31 or 51)."""

    def __init__(self, task: str = "tomato", max_macro_steps: int | None = None, horizon: int = HORIZON) -> None:
        super().__init__()
        if task not in _KITCHENS:
            raise ValueError(f"unknown Overcooked task {task!r}; choose one of {sorted(_KITCHENS)}")
        self.kitchen = _KITCHENS[task]
        self.task = self.kitchen.task_sentence
        self.max_macro_steps = MACRO_CAPS[task] if max_macro_steps is None else max_macro_steps
        self.horizon = horizon
        self.world = self.kitchen.initial_world()
        self.macro_steps = self.total_primitive_steps = 0
        self.success = False
        self._scene, self._actions = self.kitchen.describe(self.world)

    def _observation(self) -> str:
        return f"{self.task} {self._scene}"

    def _info(self, primitive_steps: int) -> dict[str, Any]:
        return {
            "admissible_actions": list(self._actions),
            "task": self.task,
            "expert_action": self.expert_action(),
            "success": self.success,
            "primitive_steps": primitive_steps,
            "total_primitive_steps": self.total_primitive_steps,
            "macro_steps": self.macro_steps,
        }

    def expert_action(self) -> str | None:
        """First action of a plan with the fewest macro actions to a correct delivery (ties: higher
        return, then slot order). Plans ignore the horizon and the macro cap; None once the episode is over."""
        if self._episode_over:
            return None
        slot = _PLANNERS[self.kitchen.task].slot(self.world)
        return None if slot is None else self._actions[slot]

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)  # nothing is random here; seeds np_random anyway
        self.world = self.kitchen.initial_world()
        self.macro_steps = self.total_primitive_steps = 0
        self.success = False
        self._scene, self._actions = self.kitchen.describe(self.world)
        self._start_episode()
        return self._observation(), self._info(0)

    def step(self, action: str | int) -> tuple[str, float, bool, bool, dict[str, Any]]:
        action = self._resolve_action(action, self._actions)
        slot = self._actions.index(action)
        reward, steps, success = self.kitchen.run_macro(self.world, slot, self.horizon - self.total_primitive_steps)
        self.macro_steps += 1
        self.total_primitive_steps += steps
        self.success = success
        terminated = success
        truncated = not terminated and (
            self.total_primitive_steps >= self.horizon or self.macro_steps >= self.max_macro_steps
        )
        self._finish_step(terminated, truncated)
        self._scene, self._actions = self.kitchen.describe(self.world)
        return self._observation(), reward, terminated, truncated, self._info(steps)

    def render(self) -> str:
        return self.kitchen.render(self.world)


__all__ = ["Kitchen", "OvercookedEnv", "World"]
