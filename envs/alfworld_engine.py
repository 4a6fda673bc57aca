"""TextWorld's ALFWorld engine (PddlEnv + AlfredDemangler), with the parsing that TextWorld redoes at every load and
reset done once per game file: the engine under envs.alfworld, and the solvability check of envs.alfworld_gen."""

from __future__ import annotations

import json
from collections import Counter, OrderedDict, defaultdict
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

import fast_downward
import textworld
from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
from textworld.core import GameState
from textworld.envs import PddlEnv
from textworld.envs.pddl import logic as pddl_logic
from textworld.envs.pddl import textgen
from textworld.envs.pddl.textgen import ContextSensitiveGrammar
from textworld.logic import Proposition, Variable


@dataclass
class _ParsedGame:
    """What TextWorld recomputes on every load or reset but depends only on the game file."""

    data: dict
    logic: pddl_logic.GameLogic
    task: Any  # Fast Downward's parsed and normalised task
    sas: str
    sas_replan: str
    init_facts: list[Proposition]


# TatSu parses of grammar templates and rule conditions, shared by all games (the strings recur).
_TEMPLATES: dict[str, list] = {}
_CONDITIONS: dict[str, textworld.logic.Rule] = {}


def _condition(text: str) -> textworld.logic.Rule:
    if text not in _CONDITIONS:
        _CONDITIONS[text] = textworld.logic.Rule.parse_conjunctive_query(text)
    return _CONDITIONS[text]


def _derive_conditional(symbol: textgen.ConditionalSymbol) -> list:
    """textgen.ConditionalSymbol.derive (and its `query`) with the condition parsed once: TatSu parsed it again at
    every use, about a quarter of an ALFWorld step."""
    context = textgen.copy_context(symbol.context)
    contexts = [context]
    if symbol.given:
        contexts = []
        for mapping in context["state"].all_assignments(_condition(symbol.given), context["mapping"]):
            matched = textgen.copy_context(context)
            matched["variables"].update({ph.name: matched["entity_infos"][var.name] for ph, var in mapping.items()})
            matched["mapping"].update(mapping)
            contexts.append(matched)
    return [symbol.expression.copy(c) for c in contexts]


class _MemoGrammar(ContextSensitiveGrammar):
    """TextWorld's text grammar, parsing each template and rule condition once rather than at every use.

    TatSu re-parsed the same few dozen strings for every admissible command at every step: about 60% of
    step time. ``derive`` and ``replace`` are the stock methods with the parses memoised.
    """

    def __init__(self, grammar: ContextSensitiveGrammar) -> None:
        super().__init__()
        self.update(grammar)

    def replace(self, start):
        rules = self._rules.get(str(start))
        if not rules:
            raise textgen.CSGUnknownSymbolError(start)
        mapping = start.context["mapping"]
        state = start.context["state"]
        applicable = [
            rule for rule in rules
            if not rule.condition or any(True for _ in state.all_assignments(_condition(rule.condition), mapping))
        ]
        # The first applicable rule, as TextWorld: drawing one would make the text vary between processes.
        symbols = deepcopy(applicable[0].rhs)
        for symbol in symbols:
            symbol.context = textgen.copy_context(start.context)
        return symbols

    def derive(self, start: str, context={}) -> str:
        if start not in _TEMPLATES:
            _TEMPLATES[start] = textgen._parse_and_convert(start, rule_name="symbols")
        derivation = deepcopy(_TEMPLATES[start])[::-1]  # symbols carry per-use context: never share them
        for symbol in derivation:
            symbol.context = textgen.copy_context(context)
        derived = []
        while derivation:
            symbol = derivation.pop()
            if isinstance(symbol, textgen.TerminalSymbol):
                derived.append(symbol)
            elif isinstance(symbol, textgen.NonterminalSymbol):
                derivation += self.replace(symbol)[::-1]
            elif isinstance(symbol, textgen.ConditionalSymbol):
                derivation += _derive_conditional(symbol)[::-1]
            elif isinstance(symbol, textgen.ListSymbol) and isinstance(symbol.symbol, textgen.ConditionalSymbol):
                symbol.symbol.context = symbol.context
                derivation += textgen.display_list(_derive_conditional(symbol.symbol), symbol.context)[::-1]
            elif isinstance(symbol, (textgen.EvalSymbol, textgen.ListSymbol)):
                derivation += symbol.derive()[::-1]
            else:
                raise NotImplementedError(f"Unknown symbol: {type(symbol)}")
        return "".join(map(str, derived))


def _parse_game(game_file: str) -> _ParsedGame:
    with open(game_file) as f:
        data = json.load(f)
    logic = pddl_logic.GameLogic(domain=data["pddl_domain"], grammar=data["grammar"])
    logic.grammar = _MemoGrammar(logic.grammar)
    task, sas = fast_downward.pddl2sas(logic.domain, data["pddl_problem"])
    _, sas_replan = fast_downward.pddl2sas(logic.domain, data["pddl_problem"], optimize=True)
    for type_ in task.types:
        try:
            logic.types.add(textworld.logic.Type(type_.name, type_.supertype_names))
        except ValueError:  # already known, as in textworld's PddlState
            pass
    name2type = {o.name: o.type_name for o in task.objects}
    init_facts = []
    for atom in task.init:
        # As textworld's PddlState: PDDL atoms become facts; "=" atoms, the cost and distances do not.
        if isinstance(atom, fast_downward.translate.pddl.conditions.Atom):
            if atom.predicate != "=":
                init_facts.append(Proposition(atom.predicate, [Variable(a, name2type[a]) for a in atom.args]))
        elif isinstance(atom, fast_downward.translate.pddl.f_expression.Assign):
            name = str(atom.expression.value)
            if atom.fluent.symbol != "total-cost" and not name.isdigit():
                init_facts.append(Proposition(name, [Variable(a, name2type[a]) for a in atom.fluent.args]))
    return _ParsedGame(data, logic, task, sas, sas_replan, init_facts)


class _PddlState(pddl_logic.PddlState):
    """textworld's PddlState built from a parsed game.

    The stock constructor runs Fast Downward's translator twice (parse domain and problem, ground, write
    SAS) on every reset, which is most of TextWorld's reset time; here that is done once per game file.
    The rest mirrors the stock constructor.
    """

    def __init__(self, downward_lib, game: _ParsedGame) -> None:
        self._facts, self._vars_by_name = defaultdict(set), {}
        self._vars_by_type, self._var_counts = defaultdict(set), Counter()
        self._logic = game.logic
        self.downward_lib = downward_lib
        self.pddl_problem = game.data["pddl_problem"]
        self.task, self.sas, self.sas_replan = game.task, game.sas, game.sas_replan
        self._actions = {a.name: a for a in self.task.actions}
        self.downward_lib.load_sas(self.sas.encode("utf-8"))
        self.downward_lib.load_sas_replan(self.sas_replan.encode("utf-8"))
        self.name2type = {o.name: o.type_name for o in self.task.objects}
        self.add_facts(game.init_facts)
        atoms = (pddl_logic.Atom * self.downward_lib.get_state_size())()
        self.downward_lib.get_state(atoms)
        self.add_facts([fact for fact in (a.get_fact(self.name2type) for a in atoms) if not fact.is_negation])


class _CachedPddlEnv(PddlEnv):
    """TextWorld's PddlEnv that keeps the parsed games of its last ``cache_size`` game files.

    One instance holds one copy of Fast Downward's library (whose search state is global), so it is
    created once per ALFWorldEnv and reused across resets and games.
    """

    def __init__(self, infos: textworld.EnvInfos, cache_size: int) -> None:
        super().__init__(infos)
        self._parsed: OrderedDict[str, _ParsedGame] = OrderedDict()
        self._cache_size = cache_size
        self._game: _ParsedGame | None = None

    def load(self, game_file: str) -> None:
        if game_file in self._parsed:
            self._parsed.move_to_end(game_file)
        else:
            self._parsed[game_file] = _parse_game(game_file)
            if len(self._parsed) > self._cache_size:
                self._parsed.popitem(last=False)
        self._game = self._parsed[game_file]
        self._game_file, self._game_data = game_file, self._game.data
        self.walkthrough = self._game_data.get("walkthrough")
        self._logic = self._game.logic
        self._pddl_state = _PddlState(self.downward_lib, self._game)
        self._entity_infos = self._get_entity_infos()

    def reset(self) -> GameState:
        # PddlEnv.reset, with the cached translation instead of a fresh PddlState.
        self._pddl_state = _PddlState(self.downward_lib, self._game)
        self.prev_state, self.state = None, GameState()
        self._last_action, self._moves = None, 0
        context = {"state": self._pddl_state, "facts": list(self._pddl_state.facts), "variables": {},
                   "mapping": {}, "entity_infos": self._entity_infos}
        self.state.feedback = self._logic.grammar.derive("#intro#", context)
        self.state.raw = self.state.feedback
        self._gather_infos()
        return self.state

    def plan(self) -> list[str]:
        """The planner's optimal command sequence from the current state ([] once the goal holds)."""
        return self._pddl_state.replan(self._entity_infos)


def make_engine(cache_size: int = 128) -> textworld.core.Wrapper:
    """TextWorld's ALFWorld engine (PddlEnv + AlfredDemangler) with parsing done once per game file.

    ``load(game_file)``, ``reset()`` and ``step(command)`` as in TextWorld; ``plan()`` gives the planner's
    commands from the current state.
    """
    return AlfredDemangler(_CachedPddlEnv(textworld.EnvInfos(won=True, admissible_commands=True), cache_size))
