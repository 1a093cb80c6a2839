"""Two-tower retrieval in PyTorch, trained nearline on a rolling window (YouTube DNN style;
in-batch softmax with logQ correction, Yi et al., RecSys 2019).

* **Item tower**: an id embedding plus the mean of its description's feature embeddings
  (categories, tags, title words: :func:`online_models.content.item_features`). During
  training the id part is dropped for ``id_dropout`` of the examples, so the feature part
  learns to stand alone: an item nobody touched, once described, gets a useful vector.
* **User tower**: the recency-weighted mean of the item-tower vectors of the user's last
  ``history`` positives (plus the session), through one linear layer; computed per request.
* **Training**: every ``retrain_every`` positives, a fresh model is trained on the last
  ``window`` (history → next positive) examples for ``epochs`` passes; logits are
  ``u·v / temperature − log q(item)`` with ``q`` the item's share of the window, so popular
  items are not over-penalised as in-batch negatives. Each training publishes a new version:
  queries always use the last published one (what a trainer process does live, here in event
  time, so replay scores the same schedule). Defaults chosen on MovieLens's validation part
  (``bench/tune_user.py``): fresh versions on a short window win, HR@10 0.0969 every 1,000
  positives on 20,000 examples against 0.0675 every 10,000 on 60,000 (0.0999 every 500, at
  twice the training).

Pure: no Kafka or Redis; users' histories live in the state store (``history``, a local row);
the window and the network are the trainer's own memory. Deterministic for a seed.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch
from torch import nn

from online_models.base import (LearnReport, NearlineModel, Query, Recommendations,
                                RetrainSchedule, top_k_dense, torch_device)
from online_models.content import item_features
from online_models.signals import SignalBatch
from schemas.items import latest_per_item


class _Towers(nn.Module):
    def __init__(self, n_items: int, n_features: int, dim: int) -> None:
        super().__init__()
        self.item_ids = nn.Embedding(n_items + 1, dim, padding_idx=0)  # 0: unknown item
        self.features = nn.EmbeddingBag(n_features + 1, dim, mode="mean", padding_idx=0)
        self.user = nn.Linear(dim, dim)
        nn.init.normal_(self.item_ids.weight, std=0.05)
        nn.init.normal_(self.features.weight, std=0.05)

    def items(self, ids: torch.Tensor, feats: torch.Tensor, keep_id: torch.Tensor | None = None
              ) -> torch.Tensor:
        """Item vectors (unnormalised): id embedding (dropped where ``keep_id`` is 0) plus
        the mean feature embedding (``feats``: rows of feature indices, 0-padded)."""
        vec = self.item_ids(ids)
        if keep_id is not None:
            vec = vec * keep_id[:, None]
        return vec + self.features(feats)

    def users(self, history_vectors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``history_vectors``: rows × length × dim; ``weights``: rows × length (0 = padding)."""
        pooled = (history_vectors * weights[..., None]).sum(1) / weights.sum(1, keepdim=True
                                                                               ).clamp(min=1e-9)
        return nn.functional.normalize(pooled + self.user(pooled), dim=-1)


class TwoTowerModel(NearlineModel):
    name = "two_tower"
    local_tables = user_tables = ("history",)

    def __init__(self, dim: int = 64, history: int = 20, recency: float = 0.8,
                 window: int = 20_000, retrain_every: int = 1_000, min_examples: int = 1_000,
                 epochs: int = 4, batch_size: int = 512, learning_rate: float = 0.005,
                 temperature: float = 0.07, id_dropout: float = 0.3,
                 title_weight: float = 1.0, seed: int = 0, device: str = "cpu") -> None:
        super().__init__()
        self.device = device
        self.dim, self.history, self.recency = dim, history, recency
        self.window, self.retrain_every, self.min_examples = window, retrain_every, min_examples
        self.epochs, self.batch_size, self.learning_rate = epochs, batch_size, learning_rate
        self.temperature, self.id_dropout = temperature, id_dropout
        self.title_weight, self.seed = title_weight, seed
        self._examples: deque[tuple[tuple[str, ...], str]] = deque(maxlen=window)
        self.schedule = RetrainSchedule(retrain_every, min_examples)
        self._features: dict[str, list[str]] = {}  # item → its description's features
        self._published: _Published | None = None

    # --- input ------------------------------------------------------------------------------
    def learn_items(self, records) -> int:
        changed = 0
        for item, record in latest_per_item(list(records)).items():
            features = sorted(item_features(record, self.title_weight))
            if self._features.get(item) != features:
                self._features[item] = features
                changed += 1
        return changed

    def _learn(self, batch: SignalBatch) -> LearnReport:
        positive = batch.select(batch.positive)
        if len(positive):
            users = list(dict.fromkeys(positive.users.tolist()))
            rows = dict(zip(users, (list(r) for r in self.store.get_local_rows("history",
                                                                                users))))
            for user, item in zip(positive.users.tolist(), positive.items.tolist()):
                row = rows[user]
                self._examples.append((tuple(row[-self.history:]), item))
                if item in row:
                    row.remove(item)
                row.append(item)
                del row[:-self.history]
            self.store.set_local_rows("history", {u: {i: float(n) for n, i in enumerate(r)}
                                                  for u, r in rows.items()})
            self.schedule.add(len(positive))
        self.train_if_due()
        return LearnReport(events=len(batch))

    @property
    def examples_held(self) -> int:
        return len(self._examples)

    # --- training ---------------------------------------------------------------------------
    def train(self) -> None:
        """Train a fresh model on the window (on ``device``) and publish it as the next
        version (on the CPU)."""
        device = torch_device(self.device)
        torch.manual_seed(self.seed + self.version)
        rng = np.random.default_rng(self.seed + self.version)
        examples = list(self._examples)
        items = sorted({i for h, t in examples for i in (*h, t)} | set(self._features))
        vocab = _Vocabulary(items, self._features)
        net = _Towers(len(items), len(vocab.feature_index), self.dim).to(device)
        optimiser = torch.optim.Adam(net.parameters(), lr=self.learning_rate)
        targets = torch.tensor([vocab.index[t] for _, t in examples], device=device)
        histories, weights = (t.to(device) for t in vocab.histories(
            [h for h, _ in examples], self.history, self.recency))
        counts = torch.bincount(targets, minlength=len(items) + 1).float()
        log_q = torch.log(counts / counts.sum()).clamp(min=-30)
        feats = vocab.feature_rows()  # kept on the CPU for the published version
        train_feats = feats.to(device)
        for _ in range(self.epochs):
            order = torch.from_numpy(rng.permutation(len(examples))).to(device)
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                batch_targets = targets[rows]
                keep = (torch.rand(len(rows), device=device) >= self.id_dropout).float()
                target_vecs = nn.functional.normalize(
                    net.items(batch_targets, train_feats[batch_targets], keep), dim=-1)
                hist = histories[rows]
                hist_vecs = net.items(hist.reshape(-1), train_feats[hist.reshape(-1)]).reshape(
                    *hist.shape, self.dim)
                users = net.users(hist_vecs, weights[rows])
                logits = users @ target_vecs.T / self.temperature - log_q[batch_targets][None]
                # the same item twice in a batch is not its own negative
                same = batch_targets[None, :] == batch_targets[:, None]
                itself = torch.eye(len(rows), dtype=torch.bool, device=device)
                logits = logits.masked_fill(same & ~itself, float("-inf"))
                loss = nn.functional.cross_entropy(
                    logits, torch.arange(len(rows), device=device))
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        net.cpu().eval()
        with torch.no_grad():
            ids = torch.arange(1, len(items) + 1)
            vectors = nn.functional.normalize(net.items(ids, feats[ids]), dim=-1)
        self._published = _Published(net, vocab, vectors, feats)
        self.schedule.published()

    # --- versions as files (the trainer's checkpoints) ---------------------------------------
    def export_version(self) -> tuple[dict, dict, list[str], np.ndarray] | None:
        """The published version as (network ``state_dict``, metadata, item ids, item
        vectors); None before the first. Tensors only: loadable with ``weights_only=True``."""
        published = self._published
        if published is None:
            return None
        meta = {"model": self.name, "version": self.version, "dim": self.dim,
                "history": self.history, "recency": self.recency, "items": published.vocab.items,
                "features": {item: published.vocab.features_of(item)
                             for item in published.vocab.items}}
        state = {**published.net.state_dict(), "_feature_rows": published.feats}
        return state, meta, published.vocab.items, published.vectors.numpy()

    def load_version(self, state: dict, meta: dict) -> None:
        """Serve the version ``export_version`` wrote (the same answers as where it trained)."""
        state = dict(state)
        feats = state.pop("_feature_rows")
        self.dim, self.history, self.recency = meta["dim"], meta["history"], meta["recency"]
        vocab = _Vocabulary(meta["items"], meta["features"])
        net = _Towers(len(vocab.items), len(vocab.feature_index), self.dim)
        net.load_state_dict(state)
        net.eval()
        with torch.no_grad():
            ids = torch.arange(1, len(vocab.items) + 1)
            vectors = nn.functional.normalize(net.items(ids, feats[ids]), dim=-1)
        self._published = _Published(net, vocab, vectors, feats)
        self.schedule.version = meta["version"]

    # --- serving ----------------------------------------------------------------------------
    def _recent(self, queries: list[Query]) -> list[tuple[str, ...]]:
        """Each query's last ``history`` items: the user's stored positives, then the
        session."""
        users = list(dict.fromkeys(q.user_id for q in queries))
        stored = dict(zip(users, self.store.get_local_rows("history", users)))
        recent = []
        for q in queries:
            row = [i for i in stored[q.user_id] if i not in q.session_items]
            recent.append(tuple((row + list(q.session_items))[-self.history:]))
        return recent

    def query_vectors(self, queries: list[Query]) -> np.ndarray:
        """The user tower's unit vector per query (zeros: nothing known, or no version)."""
        if self._published is None:
            return np.zeros((len(queries), self.dim), np.float32)
        with torch.no_grad():
            return self._published.user_vectors(self._recent(queries), self.history,
                                                self.recency).numpy()

    def _recommend(self, queries: list[Query], k: int) -> list[Recommendations]:
        published = self._published
        if published is None:
            return [Recommendations([], np.empty(0)) for _ in queries]
        block = published.scores(self._recent(queries), self.history, self.recency)
        return top_k_dense(published.item_ids, block, k, queries)


class _Vocabulary:
    """Item and feature indices of one training (0 = unknown / padding)."""

    def __init__(self, items: list[str], features: dict[str, list[str]]) -> None:
        self.items = items
        self.index = {item: n + 1 for n, item in enumerate(items)}
        names = sorted({f for item in items for f in features.get(item, ())})
        self.feature_index = {f: n + 1 for n, f in enumerate(names)}
        self._features = features

    def features_of(self, item: str) -> list[str]:
        return list(self._features.get(item, ()))

    def feature_rows(self) -> torch.Tensor:
        """(items + 1) × width feature indices, 0-padded (row 0: the unknown item)."""
        rows = [[]] + [[self.feature_index[f] for f in self._features.get(item, ())]
                       for item in self.items]
        width = max(1, max(len(r) for r in rows))
        out = torch.zeros((len(rows), width), dtype=torch.long)
        for n, row in enumerate(rows):
            out[n, :len(row)] = torch.tensor(row, dtype=torch.long)
        return out

    def histories(self, histories, length: int, recency: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-aligned item indices and recency weights (newest last, 0 = padding)."""
        ids = torch.zeros((len(histories), length), dtype=torch.long)
        weights = torch.zeros((len(histories), length))
        decay = torch.tensor([recency ** (length - 1 - n) for n in range(length)])
        for r, history in enumerate(histories):
            known = [self.index[i] for i in history if i in self.index][-length:]
            if known:
                ids[r, length - len(known):] = torch.tensor(known)
                weights[r, length - len(known):] = decay[length - len(known):]
        return ids, weights


class _Published:
    """One trained version: the network (user tower) and every known item's vector."""

    def __init__(self, net: _Towers, vocab: _Vocabulary, vectors: torch.Tensor,
                 feats: torch.Tensor) -> None:
        self.net, self.vocab, self.vectors, self.feats = net, vocab, vectors, feats
        self.item_ids = np.array(vocab.items, dtype=object)

    def user_vectors(self, histories, length: int, recency: float) -> torch.Tensor:
        ids, weights = self.vocab.histories(histories, length, recency)
        with torch.no_grad():
            vecs = self.net.items(ids.reshape(-1), self.feats[ids.reshape(-1)]).reshape(
                *ids.shape, -1)
            users = self.net.users(vecs, weights)
        return users * (weights.sum(1, keepdim=True) > 0)  # no known history: no vector

    def scores(self, histories, length: int, recency: float) -> np.ndarray:
        with torch.no_grad():
            block = self.user_vectors(histories, length, recency) @ self.vectors.T
        block = block.numpy().astype(np.float64)
        # cosine in [-1, 1]; top_k_dense keeps positive scores: shift, keeping zero rows zero
        return np.where(block != 0, block + 1.0, 0.0)
