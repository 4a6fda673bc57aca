"""The scripts are self-contained by design: each carries its own copy of the prior's sampling rule (and dqn_prior.py
and cql_prior.py share the Q-network and the acting rule). The copies must stay identical, so that `diff
dqn_prior.py cql_prior.py` shows only what differs in the algorithm.

To re-sync after editing the source copy: `python tests/test_scripts_in_sync.py --fix`.
"""

import os
import re
import sys

import pytest
from helpers import ROOT

# (what, source file, copies): a banner section ("# ---- <name> ----") or a top-level definition
SECTIONS = [("The prior's sampling rule", "dqn_prior.py", ["cql_prior.py", "gflan_prior.py", "build_dataset.py"]),
            ("Acting and evaluation", "dqn_prior.py", ["cql_prior.py"])]  # fmt: skip
DEFINITIONS = [
    ("PriorArgs", "dqn_prior.py", ["cql_prior.py", "gflan_prior.py", "build_dataset.py"]),
    ("QNetwork", "dqn_prior.py", ["cql_prior.py"]),
    ("td_target", "dqn_prior.py", ["cql_prior.py"]),
    ("td_loss", "dqn_prior.py", ["cql_prior.py"]),
    ("select_action", "dqn_prior.py", ["cql_prior.py"]),
    ("make_env", "dqn_prior.py", ["cql_prior.py", "gflan_prior.py", "bc.py", "build_dataset.py"]),
    ("make_eval_envs", "dqn_prior.py", ["cql_prior.py"]),
    ("last_eval", "dqn_prior.py", ["cql_prior.py", "gflan_prior.py", "bc.py"]),
    ("PolicyArgs", "gflan_prior.py", ["bc.py"]),
]


def text_of(path: str) -> str:
    return open(os.path.join(ROOT, path)).read()


def section(text: str, name: str) -> str:
    match = re.search(rf"^# -+ {re.escape(name)} -+\n.*?(?=^# -{{8,}} |^if __name__|\Z)", text, re.S | re.M)
    assert match is not None, f"no section {name!r}"
    return match.group(0)


def definition(text: str, name: str) -> str:
    """A top-level class or function with its decorators, up to the next top-level statement."""
    match = re.search(rf"^(?:@\w+\n)*(?:class|def) {name}\b.*?(?=^\S)", text, re.S | re.M)
    assert match is not None, f"no top-level {name}"
    return match.group(0)


CASES = [(kind, name, source, copy) for kind, table in (("section", SECTIONS), ("definition", DEFINITIONS))
         for name, source, copies in table for copy in copies]  # fmt: skip


@pytest.mark.parametrize("kind, name, source, copy", CASES, ids=[f"{c[1]}-{c[3]}" for c in CASES])
def test_copies_are_identical(kind, name, source, copy):
    get = section if kind == "section" else definition
    assert get(text_of(copy), name) == get(text_of(source), name), (
        f"{copy}'s {name!r} differs from {source}'s; run `python tests/test_scripts_in_sync.py --fix`"
    )


if __name__ == "__main__" and sys.argv[1:] == ["--fix"]:
    for kind, name, source, copy in CASES:
        get = section if kind == "section" else definition
        old = text_of(copy)
        new = old.replace(get(old, name), get(text_of(source), name))
        if new != old:
            open(os.path.join(ROOT, copy), "w").write(new)
            print(f"re-synced {name!r} in {copy}")
