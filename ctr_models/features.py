"""Which KJT keys a ranker reads, the embedding tables behind them, and the jagged → padded history helper.

Table layout (what the transfer adapters rely on):

* one TorchRec :class:`~torchrec.EmbeddingCollection` (``CTRFeatures.ec``) with **one table per base
  feature**, named ``t_<feature>``. A table serves both the candidate's single-valued feature and the
  history sequence of the same base feature: ``t_item_id`` serves ``item_id`` and ``hist_item_id``,
  ``t_category`` serves ``category`` and ``hist_category``. Sharing is what makes a pretrained item table
  useful on both sides of the ranker, and it is the name the adapters map pretrained tables onto.
* one :class:`~torchrec.EmbeddingBagCollection` (``CTRFeatures.ebc``) with mean pooling for multi-valued
  fields (``genres``; table ``t_genres``); an empty bag pools to zeros.

All tables share one ``embedding_dim`` (an ``EmbeddingCollection`` requires it, and the sequence models add
field embeddings into one token). State-dict keys look like ``features.ec.embeddings.t_item_id.weight``.

Example:
    >>> spec = FeatureSpec.from_vocab_sizes(
    ...     {"user_id": 100, "item_id": 50, "category": 10, "genres": 10, "action": 4},
    ...     FeatureConfig(embedding_dim=8, max_len=20))
    >>> spec.single_fields, spec.multi_fields, spec.history_fields, spec.target_fields
    (('user_id', 'item_id', 'category'), ('genres',), ('item_id', 'category', 'action'), ('item_id', 'category'))
    >>> spec = FeatureSpec.from_vocab_sizes(vocab_sizes, FeatureConfig(embedding_dim=8, max_len=20))
    >>> inputs = CTRFeatures(spec)(batch)          # batch: a hybrid.core.CTRBatch of 16 samples
    >>> inputs.fields.shape, inputs.history.shape, inputs.target.shape, inputs.mask.shape
    (torch.Size([16, 8, 8]), torch.Size([16, 20, 8]), torch.Size([16, 8]), torch.Size([16, 20]))
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
    PoolingType,
)

from hybrid.core import CTRBatch
from hybrid.core.feature_map import (
    HISTORY_PREFIX,
    NUM_RESERVED_IDS,
    PAD_ID,
    base_feature,
    table_name,
)
from hybrid.core.jagged import PAD_IMPLS, jagged_to_padded, lengths_to_mask
from hybrid.ctr_models._config import freeze_lists, require, require_choice

DEFAULT_MULTI_FIELDS: tuple[str, ...] = ("genres",)
DEFAULT_HISTORY_FIELDS: tuple[str, ...] = ("item_id", "category", "action")
# Base features that only exist as a history sequence (the candidate's action is what is predicted).
HISTORY_ONLY_FIELDS: tuple[str, ...] = ("action",)


@dataclass(frozen=True)
class FeatureConfig:
    """User-facing feature settings of a ranker (part of every ranker config).

    Args:
        embedding_dim: width ``D`` of every table.
        max_len: histories are cut to their most recent ``max_len`` events and right-padded to it.
        single_fields: single-valued candidate/context fields; ``None`` = every key of ``vocab_sizes``
            that is not multi-valued, not history-only (``action``) and not prefixed ``hist_``.
        multi_fields: multi-valued fields pooled by mean; ``None`` = those of ``("genres",)`` present.
        history_fields: base names of history sequences (keys ``hist_<name>``); ``None`` = those of
            ``("item_id", "category", "action")`` present. ``()`` disables the history.
        num_dense: width of ``CTRBatch.dense`` (checked at forward).
        init_std: std of the tables' init, uniform on ``±init_std·√3`` (as the pretraining model; replaced
            when pretrained tables are loaded).
        pad_impl: ``"fbgemm"`` (``torch.ops.fbgemm.jagged_to_padded_dense``, default: its backward is
            1.4–3x faster per step on CPU) or ``"gather"`` (plain PyTorch, the reference); both give
            identical values and gradients (tested).
    """

    embedding_dim: int = 32
    max_len: int = 50
    single_fields: tuple[str, ...] | None = None
    multi_fields: tuple[str, ...] | None = None
    history_fields: tuple[str, ...] | None = None
    num_dense: int = 0
    init_std: float = 0.05
    pad_impl: str = "fbgemm"

    def __post_init__(self) -> None:
        freeze_lists(self)
        name = "FeatureConfig"
        require(self.embedding_dim >= 1, name, "embedding_dim", f"must be >= 1, got {self.embedding_dim}")
        require(self.max_len >= 1, name, "max_len", f"must be >= 1, got {self.max_len}")
        require(self.num_dense >= 0, name, "num_dense", f"must be >= 0, got {self.num_dense}")
        require(self.init_std > 0, name, "init_std", f"must be > 0, got {self.init_std}")
        require_choice(self.pad_impl, PAD_IMPLS, name, "pad_impl")
        for fname in ("single_fields", "multi_fields", "history_fields"):
            value = getattr(self, fname)
            require(value is None or isinstance(value, tuple), name, fname,
                    f"must be a tuple of feature names or None, got {value!r}")

    @classmethod
    def tiny(cls) -> "FeatureConfig":
        """Small sizes for tests and smoke runs."""
        return cls(embedding_dim=8, max_len=8)


@dataclass(frozen=True)
class FeatureSpec:
    """The resolved feature layout of one ranker: fields, tables and their sizes.

    Build it with :meth:`from_vocab_sizes`; the ranker constructors do this for you.

    Args:
        single_fields: single-valued KJT keys (length 1 per sample), one embedding each.
        multi_fields: multi-valued KJT keys, mean-pooled.
        history_fields: base names of the history sequences (KJT keys ``hist_<name>``).
        target_fields: the single fields that also have a history (the candidate side of the target
            attention): the target token is the sum of their embeddings.
        table_sizes: ``t_<base> → num_embeddings`` (reserved ids included).
        embedding_dim, max_len, num_dense, init_std, pad_impl: as in :class:`FeatureConfig`.
    """

    single_fields: tuple[str, ...]
    multi_fields: tuple[str, ...]
    history_fields: tuple[str, ...]
    target_fields: tuple[str, ...]
    table_sizes: Mapping[str, int] = field(default_factory=dict)
    embedding_dim: int = 32
    max_len: int = 50
    num_dense: int = 0
    init_std: float = 0.05
    pad_impl: str = "fbgemm"

    @classmethod
    def from_vocab_sizes(cls, vocab_sizes: Mapping[str, int], config: FeatureConfig) -> "FeatureSpec":
        """Resolve ``config`` against the feature map's vocabulary sizes.

        ``vocab_sizes`` maps feature names (``item_id``, or equivalently ``hist_item_id``) to vocabulary
        sizes including the reserved PAD/OOV ids. Every field named in ``config`` must have a size.
        """
        sizes: dict[str, int] = {}
        for key, size in vocab_sizes.items():
            base = base_feature(key)
            if not isinstance(size, int) or size < NUM_RESERVED_IDS + 1:
                raise ValueError(f"vocab_sizes[{key!r}]: expected an int >= {NUM_RESERVED_IDS + 1} (sizes "
                                 f"include the {NUM_RESERVED_IDS} reserved ids), got {size!r}")
            sizes[base] = max(size, sizes.get(base, 0))

        multi = config.multi_fields
        if multi is None:
            multi = tuple(f for f in DEFAULT_MULTI_FIELDS if f in sizes)
        history = config.history_fields
        if history is None:
            history = tuple(f for f in DEFAULT_HISTORY_FIELDS if f in sizes)
        history = tuple(base_feature(f) for f in history)
        single = config.single_fields
        if single is None:
            single = tuple(f for f in sizes if f not in multi and f not in HISTORY_ONLY_FIELDS
                           and not f.startswith(HISTORY_PREFIX))
        for fname, names in (("single_fields", single), ("multi_fields", multi), ("history_fields", history)):
            missing = [n for n in names if n not in sizes]
            require(not missing, "FeatureConfig", fname,
                    f"no vocabulary size for {missing}; vocab_sizes has {sorted(sizes)}")
            require(len(set(names)) == len(names), "FeatureConfig", fname, f"duplicate names in {names}")
        both = sorted(set(single) & set(multi))
        require(not both, "FeatureConfig", "multi_fields", f"{both} also listed as single-valued fields")
        hist_multi = sorted(set(history) & set(multi))
        require(not hist_multi, "FeatureConfig", "history_fields",
                f"{hist_multi} are multi-valued; history sequences must be single-valued per event")
        require(len(single) + len(multi) > 0, "FeatureConfig", "single_fields",
                "no candidate/context field left; a ranker needs at least one")
        used = set(single) | set(multi) | set(history)
        table_sizes = {table_name(f): sizes[f] for f in sizes if f in used}
        target = tuple(f for f in history if f in single)
        return cls(single_fields=tuple(single), multi_fields=tuple(multi), history_fields=history,
                   target_fields=target, table_sizes=table_sizes, embedding_dim=config.embedding_dim,
                   max_len=config.max_len, num_dense=config.num_dense, init_std=config.init_std,
                   pad_impl=config.pad_impl)

    @property
    def num_fields(self) -> int:
        """Number of field embeddings in ``CTRInputs.fields`` (single + multi-valued)."""
        return len(self.single_fields) + len(self.multi_fields)

    @property
    def history_keys(self) -> tuple[str, ...]:
        return tuple(HISTORY_PREFIX + f for f in self.history_fields)

    @property
    def kjt_keys(self) -> tuple[str, ...]:
        """Every KJT key the ranker reads (others in the batch are ignored)."""
        return self.single_fields + self.multi_fields + self.history_keys

    @property
    def has_history(self) -> bool:
        return len(self.history_fields) > 0

    @property
    def has_target(self) -> bool:
        return len(self.target_fields) > 0


@dataclass
class CTRInputs:
    """Dense views of one :class:`CTRBatch` produced by :class:`CTRFeatures`.

    Args:
        fields: ``[B, F, D]`` embeddings of the single fields then the pooled multi-valued fields
            (order of ``field_names``).
        field_names: names of the ``F`` fields.
        target: ``[B, D]`` candidate token = sum of the target fields' embeddings, or ``None``.
            (Embeddings of PAD ids are zero everywhere.)
        history: ``[B, T, D]`` history tokens = sum of the history fields' embeddings (right-padded,
            ``T = max_len``, most recent ``max_len`` events, chronological), or ``None``.
        history_by_field: ``base name → [B, T, D]`` per-field history embeddings.
        mask: ``[B, T]`` bool, True on real events (``None`` without history).
        lengths: ``[B]`` int64 number of real events after truncation.
        history_timestamps: ``[B, T]`` int64 (0 on padding), or ``None``.
        timestamps: ``[B]`` int64 candidate time.
        dense: ``[B, num_dense]`` float.
        field_ids: ``single field → [B]`` int64 ids of the candidate/context fields (what the multimodal
            features look item vectors up by).
        history_ids: ``base name → [B, T]`` int64 ids of the history, laid out as ``history`` (PAD = 0 on
            padding).

    The rankers' bodies (``Ranker.forward_inputs``) read nothing else, so any module that fills these views
    — :class:`CTRFeatures` from a KJT, ``hybrid.ctr_models.export.ServingRanker`` from padded ids — drives
    the same ranker.
    """

    fields: torch.Tensor
    field_names: tuple[str, ...]
    target: torch.Tensor | None
    history: torch.Tensor | None
    history_by_field: dict[str, torch.Tensor]
    mask: torch.Tensor | None
    lengths: torch.Tensor | None
    history_timestamps: torch.Tensor | None
    timestamps: torch.Tensor
    dense: torch.Tensor
    field_ids: dict[str, torch.Tensor] = field(default_factory=dict)
    history_ids: dict[str, torch.Tensor] = field(default_factory=dict)


class CTRFeatures(nn.Module):
    """Embeds one :class:`CTRBatch` into the dense views every ranker consumes (:class:`CTRInputs`).

    Args:
        spec: resolved layout (:meth:`FeatureSpec.from_vocab_sizes`).
        device: where the tables are created; ``torch.device("meta")`` for a model that
            ``DistributedModelParallel`` will shard and materialise.

    Shapes:
        see :class:`CTRInputs`; ``B`` = batch size, ``F = spec.num_fields``, ``T = spec.max_len``,
        ``D = spec.embedding_dim``.

    Example:
        >>> features = CTRFeatures(FeatureSpec.from_vocab_sizes({"item_id": 50}, FeatureConfig.tiny()))
        >>> [name for name, _ in features.named_parameters()]
        ['ec.embeddings.t_item_id.weight']
    """

    def __init__(self, spec: FeatureSpec, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.spec = spec
        # Uniform with std init_std, given as bounds rather than an init_fn: TorchRec's sharded kernels
        # initialise from weight_init_min/max, so sharded and unsharded models start from the same law.
        bound = spec.init_std * math.sqrt(3.0)
        init = {"weight_init_min": -bound, "weight_init_max": bound}
        feature_names: dict[str, list[str]] = {}
        for f in spec.single_fields:
            feature_names.setdefault(table_name(f), []).append(f)
        for f in spec.history_fields:
            feature_names.setdefault(table_name(f), []).append(HISTORY_PREFIX + f)
        self.ec = EmbeddingCollection(
            tables=[EmbeddingConfig(name=t, num_embeddings=spec.table_sizes[t],
                                    embedding_dim=spec.embedding_dim, feature_names=names, **init)
                    for t, names in feature_names.items()],
            device=torch.device(device) if device is not None else None,
        ) if feature_names else None
        self.ebc = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name=table_name(f), num_embeddings=spec.table_sizes[table_name(f)],
                                       embedding_dim=spec.embedding_dim, feature_names=[f],
                                       pooling=PoolingType.MEAN, **init)
                    for f in spec.multi_fields],
            device=torch.device(device) if device is not None else None,
        ) if spec.multi_fields else None

    def check_batch(self, batch: CTRBatch) -> None:
        """Raise ``ValueError`` naming what is missing or malformed in ``batch`` for this layout."""
        keys = set(batch.sparse.keys())
        missing = [k for k in self.spec.kjt_keys if k not in keys]
        if missing:
            raise ValueError(f"CTRBatch.sparse: missing KJT keys {missing} (the ranker reads "
                             f"{list(self.spec.kjt_keys)}, the batch has {sorted(keys)})")
        if batch.dense.dim() != 2 or batch.dense.shape[1] != self.spec.num_dense:
            raise ValueError(f"CTRBatch.dense: expected shape [B, {self.spec.num_dense}] "
                             f"(FeatureConfig.num_dense), got {list(batch.dense.shape)}")

    def forward(self, batch: CTRBatch) -> CTRInputs:
        spec = self.spec
        self.check_batch(batch)
        kjt: KeyedJaggedTensor = batch.sparse
        B = batch.batch_size
        seq = self.ec(kjt) if self.ec is not None else {}
        ids = kjt.to_dict()

        def rows(key: str) -> torch.Tensor:
            # PAD ids contribute zero (TorchRec tables have no padding_idx), as in the pretraining model,
            # so a token's meaning does not depend on whether a side feature was present.
            emb = seq[key].values()
            return emb * (ids[key].values() != PAD_ID).unsqueeze(-1).to(emb.dtype)

        fields = []
        for f in spec.single_fields:
            emb = rows(f)
            if emb.shape[0] != B:
                raise ValueError(f"CTRBatch.sparse[{f!r}]: single-valued field must have exactly one id per "
                                 f"sample ({B}), got {emb.shape[0]} ids")
            fields.append(emb)
        if self.ebc is not None:
            pooled = self.ebc(kjt).to_dict()
            fields.extend(pooled[f] for f in spec.multi_fields)
        field_stack = torch.stack(fields, dim=1)

        target = None
        if spec.has_target:
            target = torch.stack([rows(f) for f in spec.target_fields], 0).sum(0)

        history = mask = lengths = hist_ts = None
        by_field: dict[str, torch.Tensor] = {}
        hist_ids: dict[str, torch.Tensor] = {}
        if spec.has_history:
            hist_lengths = seq[spec.history_keys[0]].lengths()
            for f, key in zip(spec.history_fields, spec.history_keys):
                jt = seq[key]
                # Shape-only check (no host sync): the hist_* keys must be aligned event by event.
                if jt.values().shape[0] != seq[spec.history_keys[0]].values().shape[0]:
                    raise ValueError(f"CTRBatch.sparse[{key!r}]: history sequences must all have the same "
                                     f"lengths as {spec.history_keys[0]!r}")
                # the most recent max_len events of each history
                by_field[f] = jagged_to_padded(rows(key), jt.lengths(), spec.max_len, keep="recent",
                                               impl=spec.pad_impl)
            history = torch.stack(list(by_field.values()), 0).sum(0)
            # The ids in the same layout, all fields in one gather (no host sync; ids are exact either way).
            padded_ids = jagged_to_padded(torch.stack([ids[k].values() for k in spec.history_keys], 1),
                                          hist_lengths, spec.max_len, keep="recent", impl="gather")
            hist_ids = {f: padded_ids[..., h] for h, f in enumerate(spec.history_fields)}
            mask = lengths_to_mask(hist_lengths, spec.max_len)
            lengths = mask.sum(1)
            n_events = seq[spec.history_keys[0]].values().shape[0]
            n_ts = batch.hist_timestamps.numel()
            if n_ts == n_events:      # includes a batch whose histories are all empty
                hist_ts = jagged_to_padded(batch.hist_timestamps, hist_lengths, spec.max_len, keep="recent",
                                           impl="gather")
            elif n_ts > 0:
                raise ValueError(f"CTRBatch.hist_timestamps: expected one timestamp per history event "
                                 f"({n_events}), got {n_ts}")
            # n_ts == 0 < n_events: the batch carries no history timestamps (history_timestamps = None)
        return CTRInputs(fields=field_stack, field_names=spec.single_fields + spec.multi_fields,
                         target=target, history=history, history_by_field=by_field, mask=mask,
                         lengths=lengths, history_timestamps=hist_ts, timestamps=batch.timestamps,
                         dense=batch.dense.float(), field_ids={f: ids[f].values() for f in spec.single_fields},
                         history_ids=hist_ids)
