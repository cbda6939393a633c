"""The generative pretraining model: TorchRec embedding tables + a causal sequence backbone.

Token of event ``t`` = sum of its feature embeddings (item, side features such as category, and the action
as side information, GenRank-style); PAD ids contribute zero. The backbone (``hybrid.core.backbones``,
the same module the CTR "GPSD sequence ranker" owns) encodes the right-padded tokens; position ``t``
predicts event ``t + 1``. Output item vectors are the rows of the input item table (tied, L2-normalised).

Embedding lookups go through the ``EmbeddingCollection`` only — never through ``.weight`` — so the same
code runs when ``DistributedModelParallel`` replaces it with a sharded collection. A training step does
exactly **one** lookup: the sampled negatives and the full category table ride along in the same
``KeyedJaggedTensor`` as the sequences. That matters under TorchRec's fused optimizers, which update a
table inside the backward of each lookup: two lookups of a table would apply two partial updates.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from hybrid.core.backbones import BackboneConfig, NormalLinear, build_backbone
from hybrid.core.batch import SequenceBatch
from hybrid.core.config import from_mapping
from hybrid.core.feature_map import NUM_RESERVED_IDS, PAD_ID, table_name
from hybrid.core.jagged import jagged_to_padded, lengths_to_offsets
from hybrid.pretrain.objectives import (
    ObjectiveConfig,
    full_softmax_loss,
    hr_ndcg_at_k,
    in_batch_candidates,
    log_q_from_counts,
    sample_uniform_negatives,
    sampled_softmax_loss,
)

ITEM_FEATURE = "item_id"


@dataclass(frozen=True)
class GenerativeModelConfig:
    """Configuration of :class:`GenerativeModel`.

    Args:
        backbone: the sequence backbone (``kind``, ``L{layers}H{dim}A{heads}``, ...).
        embedding_dim: width of every embedding table (they are summed into one token); ``None`` (default)
            follows ``backbone.dim``, also after ``dataclasses.replace(cfg, backbone=...)`` in a size sweep
            (:attr:`table_dim` is the resolved width). When it differs from ``backbone.dim``, bias-free
            linear projections map tokens into the backbone and hidden states back to the embedding space
            (where items are scored).
        features: KJT keys embedded into the token, one table ``t_<feature>`` each; ``item_id`` is
            required, e.g. ``("item_id", "category", "action")``.
        objective: loss settings (:class:`~hybrid.pretrain.objectives.ObjectiveConfig`).
        init_std: embedding rows are drawn from U(±init_std·√3), i.e. std ``init_std`` (GPSD: N(0, 0.02));
            uniform because TorchRec's sharded kernels initialise tables uniformly from the same bounds, so
            sharded and unsharded runs start from the same distribution.

    Example:
        >>> cfg = GenerativeModelConfig.tiny()
        >>> cfg.table_dim, cfg.features
        (16, ('item_id', 'category', 'action'))
        >>> GenerativeModelConfig(backbone=BackboneConfig.from_size("L4H128A4")).table_dim
        128
    """

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    embedding_dim: int | None = None
    features: tuple[str, ...] = (ITEM_FEATURE, "category")
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    init_std: float = 0.02

    def __post_init__(self) -> None:
        # frozen dataclass: normalise through object.__setattr__ (YAML gives lists)
        object.__setattr__(self, "features", tuple(self.features))
        if self.embedding_dim is not None and (not isinstance(self.embedding_dim, int) or self.embedding_dim < 1):
            raise ValueError(f"GenerativeModelConfig.embedding_dim must be a positive int, got {self.embedding_dim!r}")
        if ITEM_FEATURE not in self.features:
            raise ValueError(f"GenerativeModelConfig.features must include {ITEM_FEATURE!r}, got {self.features}")
        if len(set(self.features)) != len(self.features):
            raise ValueError(f"GenerativeModelConfig.features has duplicates: {self.features}")
        cat = self.objective.category_feature
        if self.objective.category_loss_weight > 0 and cat not in self.features:
            raise ValueError(
                f"objective.category_loss_weight > 0 needs the feature {cat!r} in features {self.features} "
                "(or set category_loss_weight: 0)"
            )
        if cat == ITEM_FEATURE and self.objective.category_loss_weight > 0:
            raise ValueError("objective.category_feature cannot be the item feature")

    @property
    def table_dim(self) -> int:
        """Resolved embedding width: ``embedding_dim`` or, when ``None``, ``backbone.dim``."""
        return self.embedding_dim if self.embedding_dim is not None else self.backbone.dim

    @classmethod
    def tiny(cls, kind: str = "llama") -> "GenerativeModelConfig":
        """A 2-layer, 16-wide model with item/category/action and 32 negatives, for tests and smoke runs."""
        return cls(
            backbone=BackboneConfig.tiny(kind),  # type: ignore[arg-type]
            embedding_dim=16,
            features=(ITEM_FEATURE, "category", "action"),
            objective=ObjectiveConfig(num_negatives=32),
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["features"] = list(self.features)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GenerativeModelConfig":
        """Inverse of :meth:`to_dict` (nested dicts for ``backbone`` and ``objective``); an unknown key or a
        wrong type raises a ``ValueError`` naming the key (``backbone.norm_eps``)."""
        return from_mapping(cls, data, source="GenerativeModelConfig")


class GenerativeModel(nn.Module):
    """GPSD-style generative model over behaviour sequences.

    Args:
        config: :class:`GenerativeModelConfig`.
        vocab_sizes: rows per feature table, each including the reserved ids (PAD=0, OOV=1), e.g. from the
            feature map; extra keys are ignored.
        device: device of the dense modules (backbone, projections); ``"meta"`` builds them without storage.
        embedding_device: device of the embedding tables (default: ``device``). Build them on ``"meta"``
            and let ``DistributedModelParallel`` shard and materialise them.

    Methods:
        ``forward(batch) -> (hidden [B, T, dim], lengths [B])``; ``loss(batch) -> {"loss", "item_loss",
        "category_loss"}``; ``retrieval_metrics(batch, k)``; ``item_table()``;
        ``dense_parameter_count()`` (backbone only, as GPSD) and ``sparse_parameter_count()`` (tables).

    Example:
        >>> model = GenerativeModel(GenerativeModelConfig.tiny(), {"item_id": 50, "category": 7, "action": 4})
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["item_id", "category", "action"],
        ...     values=torch.tensor([5, 6, 7, 2, 3, 4, 2, 2, 3]), lengths=torch.tensor([2, 1, 2, 1, 2, 1]))
        >>> batch = SequenceBatch(kjt, timestamps=torch.tensor([10, 20, 15]), lengths=torch.tensor([2, 1]))
        >>> hidden, lengths = model(batch)
        >>> hidden.shape, sorted(model.loss(batch))
        (torch.Size([2, 2, 16]), ['category_loss', 'item_loss', 'loss'])
    """

    def __init__(
        self,
        config: GenerativeModelConfig,
        vocab_sizes: Mapping[str, int],
        *,
        device: torch.device | str | None = None,
        embedding_device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        missing = [f for f in config.features if f not in vocab_sizes]
        if missing:
            raise ValueError(f"vocab_sizes lacks feature(s) {missing}; the model embeds {list(config.features)}")
        sizes = {f: int(vocab_sizes[f]) for f in config.features}
        too_small = {f: n for f, n in sizes.items() if n <= NUM_RESERVED_IDS}
        if too_small:
            raise ValueError(
                f"vocabulary sizes must exceed the {NUM_RESERVED_IDS} reserved ids (PAD, OOV): {too_small}"
            )
        self.config = config
        self.vocab_sizes: dict[str, int] = sizes
        self._features: tuple[str, ...] = config.features
        emb_dim, dim = config.table_dim, config.backbone.dim
        bound = config.init_std * math.sqrt(3.0)
        tables = [
            EmbeddingConfig(
                name=table_name(f),
                embedding_dim=emb_dim,
                num_embeddings=sizes[f],
                feature_names=[f],
                weight_init_min=-bound,
                weight_init_max=bound,
            )
            for f in config.features
        ]
        emb_device = embedding_device if embedding_device is not None else device
        self.embeddings = EmbeddingCollection(
            tables=tables, device=torch.device(emb_device) if emb_device is not None else None
        )
        std = config.backbone.init_std
        self.input_proj = (
            NormalLinear(emb_dim, dim, bias=False, init_std=std, device=device) if emb_dim != dim else None
        )
        self.backbone = build_backbone(config.backbone, device=device)
        self.output_proj = (
            NormalLinear(dim, emb_dim, bias=False, init_std=std, device=device) if emb_dim != dim else None
        )

    # ------------------------------------------------------------------ counts and tables

    @property
    def table_names(self) -> dict[str, str]:
        """Feature → table name (``{"item_id": "t_item_id", ...}``)."""
        return {f: table_name(f) for f in self._features}

    def dense_parameter_count(self) -> int:
        """Backbone blocks + final norm (GPSD's "dense parameters"; projections excluded)."""
        return self.backbone.dense_parameter_count()

    def sparse_parameter_count(self) -> int:
        """Rows x width of every embedding table (from the config, so it also holds when sharded)."""
        return sum(n * self.config.table_dim for n in self.vocab_sizes.values())

    def reset_parameters(self) -> None:
        """Initialise every parameter, tables included (e.g. after ``to_empty()`` of a meta-built model).

        Unsharded only: a sharded collection is initialised by ``DistributedModelParallel``.
        """
        self.backbone.reset_parameters()
        for proj in (self.input_proj, self.output_proj):
            if proj is not None:
                proj.reset_parameters()
        if isinstance(self.embeddings, EmbeddingCollection):
            # EmbeddingCollection.reset_parameters() is a no-op when it was built on meta; call init_fn directly
            for cfg in self.embeddings.embedding_configs():
                assert cfg.init_fn is not None
                cfg.init_fn(self.embeddings.embeddings[cfg.name].weight)

    def _dense_device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @torch.no_grad()
    def feature_table(self, feature: str, chunk_size: int = 1 << 16) -> torch.Tensor:
        """All rows ``[V, E]`` of a feature's table, looked up through the collection (works sharded)."""
        size = self.vocab_sizes[feature]
        device = self._dense_device()
        parts = []
        for start in range(0, size, chunk_size):
            ids = torch.arange(start, min(size, start + chunk_size), device=device)
            # one "sample" holding the ids; every other feature empty (the collection wants all its keys)
            lengths = torch.tensor(
                [ids.numel() if f == feature else 0 for f in self._features], dtype=torch.int64, device=device
            )
            kjt = KeyedJaggedTensor.from_lengths_sync(keys=list(self._features), values=ids, lengths=lengths)
            parts.append(self.embeddings(kjt)[feature].values())
        return torch.cat(parts)

    def item_table(self, chunk_size: int = 1 << 16) -> torch.Tensor:
        """The item vectors ``[V_item, E]`` (raw rows; scoring normalises them)."""
        return self.feature_table(ITEM_FEATURE, chunk_size)

    # ------------------------------------------------------------------ encoding

    def _lookup(
        self,
        batch: SequenceBatch,
        extra: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One collection lookup of the batch's sequences plus ``extra`` ids per feature.

        ``extra[f] = (values, lengths [B])`` are appended to each sample's list of feature ``f``.

        Returns:
            ``seq_ids[f] [N]``, ``seq_emb[f] [N, E]`` (the sequence events, jagged, in batch order) and
            ``extra_emb[f] [M_f, E]`` (the extra ids, in the given order).
        """
        extra = extra or {}
        jts = batch.features.to_dict()
        missing = [f for f in self._features if f not in jts]
        if missing:
            raise ValueError(
                f"SequenceBatch.features lacks key(s) {missing}; the model embeds {list(self._features)}"
            )
        num_events = batch.timestamps.numel()
        keys, values, lengths = [], [], []
        seq_ids: dict[str, torch.Tensor] = {}
        seq_pos: dict[str, torch.Tensor] = {}
        extra_pos: dict[str, torch.Tensor] = {}
        for f in self._features:
            ids, lens = jts[f].values(), jts[f].lengths().to(torch.int64)
            if ids.numel() != num_events:
                raise ValueError(
                    f"feature {f!r} has {ids.numel()} values but the batch has {num_events} events "
                    "(every sequence feature needs one value per event)"
                )
            seq_ids[f] = ids
            if f in extra:
                extra_ids, extra_lens = extra[f]
                extra_lens = extra_lens.to(torch.int64)
                merged_offsets = lengths_to_offsets(lens + extra_lens)[:-1]
                # destination of each sequence value / extra value inside the merged per-sample lists
                seq_pos[f] = merged_offsets.repeat_interleave(lens) + _rank_in_segment(lens)
                extra_pos[f] = (merged_offsets + lens).repeat_interleave(extra_lens) + _rank_in_segment(extra_lens)
                merged = ids.new_empty(ids.numel() + extra_ids.numel())
                merged[seq_pos[f]] = ids
                merged[extra_pos[f]] = extra_ids.to(ids.dtype)
                ids, lens = merged, lens + extra_lens
            keys.append(f)
            values.append(ids)
            lengths.append(lens)
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))
        out = self.embeddings(kjt)
        seq_emb, extra_emb = {}, {}
        for f in self._features:
            rows = out[f].values()
            seq_emb[f] = rows[seq_pos[f]] if f in extra else rows
            if f in extra:
                extra_emb[f] = rows[extra_pos[f]]
        return seq_ids, seq_emb, extra_emb

    def _encode(
        self, batch: SequenceBatch, seq_ids: Mapping[str, torch.Tensor], seq_emb: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Sum feature embeddings into tokens, pad, run the backbone → ``hidden [B, T, dim]``."""
        lengths = batch.lengths.to(device=self._dense_device(), dtype=torch.int64)
        tokens = None
        for f in self._features:
            # PAD ids contribute nothing (TorchRec tables have no padding_idx) and get no gradient
            rows = seq_emb[f] * (seq_ids[f] != PAD_ID).unsqueeze(-1).to(seq_emb[f].dtype)
            tokens = rows if tokens is None else tokens + rows
        assert tokens is not None
        t = int(lengths.max().item()) if lengths.numel() else 0
        x = jagged_to_padded(tokens, lengths, t, keep="first")
        if self.input_proj is not None:
            x = self.input_proj(x)
        timestamps = None
        if self.config.backbone.kind == "hstu":
            timestamps = jagged_to_padded(batch.timestamps.to(x.device), lengths, t, keep="first")
        return self.backbone(x, lengths, timestamps), lengths, t

    def forward(self, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a batch.

        Returns:
            ``hidden [B, T, dim]`` (``T`` = longest sequence of the batch; zero at padding) and
            ``lengths [B]``. Position ``t`` summarises events ``0..t`` and predicts event ``t + 1``.
        """
        seq_ids, seq_emb, _ = self._lookup(batch)
        hidden, lengths, _ = self._encode(batch, seq_ids, seq_emb)
        return hidden, lengths

    def query_vectors(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states in the embedding space (``[..., E]``, not yet L2-normalised)."""
        return self.output_proj(hidden) if self.output_proj is not None else hidden

    # ------------------------------------------------------------------ objectives

    def _target_mask(self, lengths: torch.Tensor, t: int, num_eval_targets: int) -> torch.Tensor:
        """``[B, T]`` True where position ``i`` has a next event ``i + 1`` that is a target."""
        pos = torch.arange(t, device=lengths.device).unsqueeze(0)
        last = lengths.unsqueeze(1) - 1  # index of the last event
        mask = pos < last
        if num_eval_targets > 0:
            # only the trailing num_eval_targets events are held-out targets
            mask &= pos >= last - num_eval_targets
        return mask

    def loss(
        self,
        batch: SequenceBatch,
        *,
        item_counts: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Weighted next-item (+ next-category) loss of a batch.

        Targets: position ``i`` predicts event ``i + 1``; for evaluation batches
        (``batch.num_eval_targets = k > 0``) only the last ``k`` events are targets. Targets with a
        reserved id (PAD, OOV) are skipped.

        Args:
            batch: a :class:`~hybrid.core.batch.SequenceBatch` with every feature of ``config.features``.
            item_counts: ``[V_item]`` item frequencies, required for in-batch negatives with logQ correction.
            generator: RNG of the negative sampling (default: torch's global RNG).

        Returns:
            ``{"loss": weighted sum, "item_loss": ..., "category_loss": ...}`` (the last only when its
            weight is > 0).
        """
        obj = self.config.objective
        device = self._dense_device()
        b = batch.batch_size
        n_items = self.vocab_sizes[ITEM_FEATURE]
        cat = obj.category_feature
        use_category = obj.category_loss_weight > 0
        log_q = None
        if obj.negatives == "in_batch" and obj.logq_correction:
            if item_counts is None:
                raise ValueError("in-batch negatives with logq_correction need item_counts [V_item]")
            if item_counts.numel() != n_items:
                raise ValueError(f"item_counts has {item_counts.numel()} entries, the item table {n_items} rows")
            log_q = log_q_from_counts(item_counts).to(device)

        extra: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        negative_ids = None
        if obj.negatives == "uniform":
            negative_ids = sample_uniform_negatives(b, obj.num_negatives, n_items, device=device, generator=generator)
            extra[ITEM_FEATURE] = (negative_ids.reshape(-1), torch.full((b,), obj.num_negatives, device=device))
        if use_category:
            n_cat = self.vocab_sizes[cat]
            # the whole category table rides on sample 0 of the same lookup (full softmax)
            cat_lengths = torch.zeros(b, dtype=torch.int64, device=device)
            cat_lengths[0] = n_cat
            extra[cat] = (torch.arange(n_cat, device=device), cat_lengths)

        seq_ids, seq_emb, extra_emb = self._lookup(batch, extra)
        hidden, lengths, t = self._encode(batch, seq_ids, seq_emb)
        query = self.query_vectors(hidden)
        has_next = self._target_mask(lengths, t, batch.num_eval_targets)

        item_ids = _shift_left(jagged_to_padded(seq_ids[ITEM_FEATURE], lengths, t, keep="first"))  # [B, T] next item
        item_vecs = _shift_left(jagged_to_padded(seq_emb[ITEM_FEATURE], lengths, t, keep="first"))  # [B, T, E]
        item_mask = has_next & (item_ids >= NUM_RESERVED_IDS)
        temperature = obj.temperature
        if obj.negatives == "uniform":
            assert negative_ids is not None
            neg_vecs = extra_emb[ITEM_FEATURE].view(b, obj.num_negatives, -1)
            item_loss = sampled_softmax_loss(
                query, item_mask, item_ids, item_vecs, negative_ids, neg_vecs, temperature
            )
        else:
            rows, ids, vecs = query[item_mask], item_ids[item_mask], item_vecs[item_mask]
            cand_ids, cand_vecs = in_batch_candidates(ids, vecs, obj.num_negatives, generator=generator)
            item_loss = sampled_softmax_loss(
                rows.unsqueeze(0),
                torch.ones(1, rows.size(0), dtype=torch.bool, device=rows.device),
                ids.unsqueeze(0),
                vecs.unsqueeze(0),
                cand_ids,
                cand_vecs,
                temperature,
                log_q=log_q,
            )
        losses = {"item_loss": item_loss}
        total = obj.item_loss_weight * item_loss
        if use_category:
            cat_ids = _shift_left(jagged_to_padded(seq_ids[cat], lengths, t, keep="first"))
            cat_mask = has_next & (cat_ids >= NUM_RESERVED_IDS)
            cat_loss = full_softmax_loss(query[cat_mask], cat_ids[cat_mask], extra_emb[cat], temperature)
            losses["category_loss"] = cat_loss
            total = total + obj.category_loss_weight * cat_loss
        losses["loss"] = total
        return losses

    @torch.no_grad()
    def retrieval_metrics(
        self,
        batch: SequenceBatch,
        k: int = 10,
        *,
        item_table: torch.Tensor | None = None,
        chunk_size: int = 1 << 16,
    ) -> dict[str, torch.Tensor]:
        """HR@k and NDCG@k of every target of the batch, ranked over the full item set.

        Targets are chosen as in :meth:`loss` (for evaluation batches: the trailing
        ``num_eval_targets`` events, each predicted from everything before it), except that a target the
        feature map does not know (the OOV id: an item first seen after training) stays in: no model can
        rank it, so it counts as a miss (``hr = ndcg = 0``) instead of leaving the denominator, which would
        flatter every model and baseline alike.

        Args:
            batch: the batch to score.
            k: cut-off.
            item_table: ``[V_item, E]`` from :meth:`item_table`, to build it once per evaluation pass
                (default: looked up on every call).
            chunk_size: items scored (and looked up) at a time.

        Returns:
            ``{"hr@k": [N], "ndcg@k": [N], "oov": [N] bool}`` per target (average over the evaluation set);
            ``oov`` marks the unknown targets (all misses).
        """
        seq_ids, seq_emb, _ = self._lookup(batch)
        hidden, lengths, t = self._encode(batch, seq_ids, seq_emb)
        item_ids = _shift_left(jagged_to_padded(seq_ids[ITEM_FEATURE], lengths, t, keep="first"))
        mask = self._target_mask(lengths, t, batch.num_eval_targets) & (item_ids != PAD_ID)
        targets = item_ids[mask]
        known = targets >= NUM_RESERVED_IDS
        table = item_table if item_table is not None else self.item_table(chunk_size)
        hr, ndcg = torch.zeros(targets.shape, device=targets.device), torch.zeros(targets.shape, device=targets.device)
        if known.any():
            hr[known], ndcg[known] = hr_ndcg_at_k(self.query_vectors(hidden)[mask][known], table, targets[known], k,
                                                  chunk_size=chunk_size)
        return {f"hr@{k}": hr, f"ndcg@{k}": ndcg, "oov": ~known}


def _rank_in_segment(lengths: torch.Tensor) -> torch.Tensor:
    """``[2, 3]`` → ``[0, 1, 0, 1, 2]``: each element's index inside its segment."""
    total = lengths.sum()
    starts = lengths_to_offsets(lengths)[:-1].repeat_interleave(lengths)
    return torch.arange(int(total), device=lengths.device) - starts


def _shift_left(padded: torch.Tensor) -> torch.Tensor:
    """``x[:, i] <- x[:, i + 1]`` (the next event), zero-filled at the end."""
    return torch.cat([padded[:, 1:], torch.zeros_like(padded[:, :1])], dim=1)
