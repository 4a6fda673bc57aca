"""Fixtures shared by the test files; plain helper functions are in helpers.py."""

import pytest

from helpers import make_tiny_model


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
