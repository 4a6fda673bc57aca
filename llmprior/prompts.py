"""The texts the models read: the LLM prior's prompt (the authors', per env family), the Q-network's (state, action)
string (the authors' BERT input) and the LM policy's prompt (GLAM's). A change here changes every cache key and
every result: the tests hold them to the authors' words."""

from __future__ import annotations

import dataclasses
import re

OVERCOOKED_TASKS = {
    "overcooked-tomato": "Your task is to serve the dish of a bowl only containing chopped tomato.",
    "overcooked-salad": "Your task is to serve the dish of a bowl only containing chopped tomato and lettuce.",
}
# The authors' Tomato question says "chopped tomatoes"; the Salad wording is not published, this is its analogue.
OVERCOOKED_DISHES = {"overcooked-tomato": "chopped tomatoes", "overcooked-salad": "chopped tomatoes and lettuce"}
ADMISSIBLE_PREFIX = "You are allowed to take the following actions: "


def default_history(env_id: str) -> int:
    """(observation, action) pairs the authors put in the prompt: Tomato 3, Salad 5, none elsewhere."""
    return {"overcooked-tomato": 3, "overcooked-salad": 5}.get(env_id, 0)


def default_score_normalize(env_id: str) -> str:
    """What `--prior.score-normalize auto` means for an env: the scoring under which the embedded Gemma-3-270M's
    `dist` proposals (k = 5, temperature 3) hold the expert's action most often, measured on 40+ expert and
    noisy-expert states per env (benchmarks/prior_quality.py, results/prior_quality.csv, coverage@5):
    Overcooked: the `mean` token log-probability (Tomato 0.76, Salad 0.65 against 0.71, 0.45 summed; uniform draws
    0.67, 0.49); ALFWorld: `pmi` (0.38 against 0.20 summed; uniform 0.21); FrozenLake and the rest: the `sum`,
    the paper's (FrozenLake 0.77 summed, 0.33 mean, 0.77 PMI; uniform 0.76)."""
    if env_id.startswith("overcooked"):
        return "mean"
    if env_id.startswith("alfworld"):
        return "pmi"
    return "sum"


def resolve_score_normalize(prior_args, env_id: str, authors_code: bool = False):
    """A script's --prior.* settings with `auto` scoring resolved for this env (a copy: the run's args stay as given,
    for --resume); the authors' code sums; the synthetic prior has no scores to normalise."""
    if prior_args.score_normalize != "auto" or prior_args.backend == "synthetic":
        return prior_args
    chosen = "sum" if authors_code else default_score_normalize(env_id)
    return dataclasses.replace(prior_args, score_normalize=chosen)


def build_prompt(env_id: str, task: str, obs: str, admissible: list[str], history: list[tuple[str, str]]) -> str:
    """The prior's prompt for one state; `history` holds the last N (observation, action) pairs, already cut."""
    if env_id.startswith("overcooked"):
        # The authors' Overcooked prompt, word for word (spec "Prompt the paper's authors used for Overcooked"),
        # with the admissible actions as a Python list ("[...]"). A base model completes after "Action:".
        dish = OVERCOOKED_DISHES.get(env_id, OVERCOOKED_DISHES["overcooked-tomato"])
        lines = "\n".join(f"Observation: {o}. Action: {a}." for o, a in history)
        return (
            f"{task or OVERCOOKED_TASKS.get(env_id, OVERCOOKED_TASKS['overcooked-tomato'])}\nHistory:\n{lines}"
            f"\nCurrent Observation: {obs}\nTo serve the dish of a bowl containing only {dish}, what action should "
            "you take next? Based on your previous observations and actions, please select only one action for the "
            f"next step from the admissible actions: {list(admissible)}. Action:"
        )
    history_block = "".join(f"Observation: {o}. Action: {a}.\n" for o, a in history)
    history_block = f"History:\n{history_block}" if history else ""
    if env_id.startswith("alfworld"):
        # The authors' LLF-Bench prompt: LLF-Bench appends ". You are allowed to take ..." to the TextWorld text, so
        # the doubled periods ("armchair.. You are allowed") are theirs too (paper App. 9.2 shows them).
        goal = re.sub(r"^\s*your task is to:\s*", "", task, flags=re.IGNORECASE).strip()
        if ADMISSIBLE_PREFIX not in obs:
            obs = f"{obs}. {ADMISSIBLE_PREFIX}{', '.join(admissible)}."
        return (
            f"Task: Your task is to: {goal}.\n{history_block}Current observation:{obs}\n"
            "Please select an action from the admissible actions. \n Action:"
        )
    # FrozenLake and any other env: the same LLF-Bench-style layout (paper App. 9.1 describes FrozenLake's state
    # and actions in these words).
    return (
        f"Task: {task}\n{history_block}Current observation: {obs}\n{ADMISSIBLE_PREFIX}{', '.join(admissible)}.\n"
        "Please select an action from the admissible actions.\nAction:"
    )


def feature_text(env_id: str, task: str, obs: str, action: str) -> str:
    """One string per (state, action), as the authors fed BERT (two spaces after the comma are theirs). The task leads
    where it tells the games of a set apart and no later observation repeats it (ALFWorld; TextWorld: the goal)."""
    if env_id.startswith(("alfworld", "textworld")):
        return f"{task},  Action: {action}, for Observation: {obs},"
    return f"Observation: {obs},  Action: {action}."


def default_policy_history(env_id: str) -> int:
    """(observation, action) pairs before the current observation in the LM policy's prompt: BabyAI 2 (GLAM's last 3
    observations), 0 elsewhere, where the observation is the state."""
    return 2 if env_id.startswith("babyai") else 0


def policy_prompt(task: str, obs: str, actions: list[str], history: list[tuple[str, str]]) -> str:
    """GLAM's prompt (Carta et al. 2023, BabyAI-Text) for every env: the possible actions, the goal, the last
    observations with the actions taken, and "Action k:" for the LM to continue with an action."""
    lines = [f"Possible action of the agent: {', '.join(actions)}", f"Goal of the agent: {task}"]
    for i, (o, a) in enumerate(history):
        lines += [f"Observation {i}: {o}", f"Action {i}: {a}"]
    lines += [f"Observation {len(history)}: {obs}", f"Action {len(history)}:"]
    return " \n ".join(lines)
