"""The scripts are self-contained by design, so shared sections are copies: keep them identical.

To re-sync after editing dqn_prior.py: `python tests/test_scripts_in_sync.py --fix`.
"""

import os
import re
import sys

import pytest
from helpers import ROOT

# section banner -> scripts that carry a copy of dqn_prior.py's
SHARED = {
    "LLM action prior": ["cql_prior.py", "gflan_prior.py"],
    "Q-network over a frozen text encoder": ["cql_prior.py"],
    "LM policy (GLAM)": ["bc.py"],  # gflan_prior.py's copy is the reference for this one
    "Saved arguments and resuming": ["cql_prior.py", "gflan_prior.py", "bc.py"],  # each script's own RESUME_OVERRIDES stay apart
}
SOURCE = {"LM policy (GLAM)": "gflan_prior.py"}


def section(path: str, name: str) -> str:
    text = open(os.path.join(ROOT, path)).read()
    match = re.search(rf"^# -+ {re.escape(name)} -+\n.*?(?=^# -{{8,}} |\Z)", text, re.S | re.M)
    if match is None:
        raise AssertionError(f"{path} has no section {name!r}")
    return match.group(0)


CASES = [(name, copy) for name, copies in SHARED.items() for copy in copies]


@pytest.mark.parametrize("name, copy", CASES)
def test_shared_sections_are_identical(name, copy):
    source = SOURCE.get(name, "dqn_prior.py")
    assert section(copy, name) == section(source, name), (
        f"{copy}'s section {name!r} differs from {source}'s; run `python tests/test_scripts_in_sync.py --fix`"
    )


if __name__ == "__main__" and sys.argv[1:] == ["--fix"]:
    for name, copy in CASES:
        source = SOURCE.get(name, "dqn_prior.py")
        path = os.path.join(ROOT, copy)
        text = open(path).read()
        new = text.replace(section(copy, name), section(source, name))
        if new != text:
            open(path, "w").write(new)
            print(f"re-synced {name!r} in {copy}")
