"""Fixtures shared by the test files; plain helper functions are in helpers.py."""

import os

# pytest.ini runs the tests in two processes (pytest-xdist, a test file per process): one thread each, for torch here
# and for the scripts the tests start, so that the two share the cores instead of fighting over them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from helpers import make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory: tiny_model(kind, corpus, name=None, **options) -> the folder of a tiny random model + tokenizer
    (helpers.make_tiny_model), built once per session for each distinct set of arguments. `name` prefixes the
    folder (kind by default); options: vocab_size, max_position_embeddings."""
    built = {}

    def build(kind, corpus, name=None, **options):
        key = (kind, tuple(corpus), name, tuple(sorted(options.items())))
        if key not in built:
            built[key] = make_tiny_model(kind, tmp_path_factory.mktemp(name or kind), corpus, **options)
        return built[key]

    return build
