"""What the training scripts share that is not the method: LLM runtimes, model files, caches, data files and runs.

The scripts (`dqn_prior.py`, `cql_prior.py`, `gflan_prior.py`, `bc.py`, `build_dataset.py`) keep what defines the
algorithm: networks, losses, the training loop and the prior's sampling rule. They import the rest from here, the way
CleanRL scripts import a replay buffer:

- `models`: where a model's weights come from (the embedded GGUF files, a local folder, a hub id), loaded as a
  transformers model; the cache folder ($LLMPRIOR_CACHE, default ~/.cache/llmprior).
- `backends`: log-likelihoods and samples of an LLM given a prompt (transformers, vLLM, an OpenAI-compatible server)
  and the synthetic prior of known quality. A script's prior turns them into proposals.
- `cache`: the SQLite caches of proposals / scores and of text embeddings, shared by runs and processes.
- `encoder`: the frozen text encoder under the Q-network, with its embedding table.
- `policy`: the language-model policy of GFlan(-Prior) and BC (GLAM's action scoring, LoRA, the frozen-trunk cache).
- `prompts`: the prompts the prior and the LM policy read, and the Q-network's (state, action) strings.
- `data`: the offline dataset file (docs/dataset_format.md).
- `runs`: a run's folder, logs, checkpoints, resuming, interrupts and one-line errors.

Modules import torch and transformers only when used, so that `python <script> --help` answers at once.
"""

import os

# transformers' "Loading weights" progress bar would print to stderr at every model load
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
