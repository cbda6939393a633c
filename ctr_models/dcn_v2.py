"""DCN-v2 ranker (Wang et al., WWW 2021): cross network + deep network, stacked or parallel.

Cross layer (full rank): ``x_{l+1} = x0 ⊙ (W_l x_l + b_l) + x_l``; low rank: ``W_l ≈ U_l V_l``; mixture of
low-rank experts (DCN-Mix): ``x_{l+1} = Σ_i softmax(G(x_l))_i · x0 ⊙ (U_i g(C_i g(V_i x_l)) + b_l) + x_l``.
The cross layers are torchrec's :class:`~torchrec.modules.crossnet.CrossNet`,
:class:`~torchrec.modules.crossnet.LowRankCrossNet` and
:class:`~torchrec.modules.crossnet.LowRankMixtureCrossNet` (ReLU as ``g``; FuxiCTR/RecBole use tanh, so
numbers are not directly comparable).

Input ``x0 = [field embeddings; history vector; dense]``. Because ``x0`` multiplies every cross layer, dense
features should be standardised upstream; unscaled counts make the cross terms blow up.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec.modules.crossnet import CrossNet, LowRankCrossNet, LowRankMixtureCrossNet

from hybrid.core import CTRBatch
from hybrid.ctr_models._config import (
    freeze_lists,
    require,
    require_choice,
    require_positive_ints,
)
from hybrid.ctr_models.base import Ranker
from hybrid.ctr_models.features import CTRInputs, FeatureConfig
from hybrid.ctr_models.history import HistoryConfig
from hybrid.ctr_models.inputs import FlatInput
from hybrid.ctr_models.layers import MLP, TaskHeads
from hybrid.ctr_models.multimodal import MultimodalConfig, build_multimodal

CROSS_TYPES = ("full", "low_rank", "mixture")
STRUCTURES = ("stacked", "parallel")


@dataclass(frozen=True)
class DCNv2Config:
    """Configuration of :class:`DCNv2`.

    Args:
        features: embedding/feature settings.
        history: history encoder (``pooled``, ``target``, ``transformer`` or ``none``).
        cross_type: ``"full"`` (d×d per layer), ``"low_rank"`` (U V^T, rank ``low_rank``) or ``"mixture"``
            (``num_experts`` low-rank experts with a softmax gate).
        num_cross_layers: cross layers (the paper finds 2–3 enough).
        low_rank: rank ``r`` for low_rank/mixture; ``None`` = ``max(1, d // 4)`` (≈ full-rank accuracy).
        num_experts: experts of the mixture (ignored otherwise).
        structure: ``"stacked"`` (x0 → cross → deep → heads) or ``"parallel"``
            (``[cross(x0); deep(x0)]`` → heads).
        deep_hidden: hidden sizes of the deep network (``()`` = cross network only).
        tower_hidden: hidden sizes of each task's tower on top (``()`` = one linear layer per task).
        dropout: dropout in the deep network and towers.
        multimodal: SimTier / MNSE / MK-MMD over item vectors (appended to ``x0``; all off by default).
    """

    features: FeatureConfig = field(default_factory=FeatureConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    cross_type: str = "low_rank"
    num_cross_layers: int = 3
    low_rank: int | None = None
    num_experts: int = 4
    structure: str = "stacked"
    deep_hidden: tuple[int, ...] = (256, 128)
    tower_hidden: tuple[int, ...] = ()
    dropout: float = 0.0
    multimodal: MultimodalConfig = field(default_factory=MultimodalConfig)

    def __post_init__(self) -> None:
        freeze_lists(self)
        name = "DCNv2Config"
        require_choice(self.cross_type, CROSS_TYPES, name, "cross_type")
        require_choice(self.structure, STRUCTURES, name, "structure")
        require(self.num_cross_layers >= 1, name, "num_cross_layers", f"must be >= 1, got {self.num_cross_layers}")
        require(self.low_rank is None or self.low_rank >= 1, name, "low_rank",
                f"must be >= 1 or None, got {self.low_rank}")
        require(self.num_experts >= 1, name, "num_experts", f"must be >= 1, got {self.num_experts}")
        require_positive_ints(self.deep_hidden, name, "deep_hidden")
        require_positive_ints(self.tower_hidden, name, "tower_hidden")
        require(0.0 <= self.dropout < 1.0, name, "dropout", f"must be in [0, 1), got {self.dropout}")

    @classmethod
    def tiny(cls) -> "DCNv2Config":
        return cls(features=FeatureConfig.tiny(), history=HistoryConfig.tiny(), num_cross_layers=2,
                   deep_hidden=(32, 16))


def build_cross_net(cross_type: str, in_features: int, num_layers: int, low_rank: int | None,
                    num_experts: int) -> nn.Module:
    """The torchrec cross network for ``cross_type`` on ``[B, in_features]`` inputs (shape-preserving).

    Example:
        >>> net = build_cross_net("mixture", 16, num_layers=2, low_rank=4, num_experts=3)
        >>> net(torch.randn(5, 16)).shape
        torch.Size([5, 16])
    """
    require_choice(cross_type, CROSS_TYPES, "DCNv2Config", "cross_type")
    rank = low_rank if low_rank is not None else max(1, in_features // 4)
    if cross_type == "full":
        return CrossNet(in_features=in_features, num_layers=num_layers)
    if cross_type == "low_rank":
        return LowRankCrossNet(in_features=in_features, num_layers=num_layers, low_rank=rank)
    return LowRankMixtureCrossNet(in_features=in_features, num_layers=num_layers, num_experts=num_experts,
                                  low_rank=rank)


class DCNv2(Ranker):
    """DCN-v2 ranker over field embeddings, an encoded history and dense features.

    Args:
        config: :class:`DCNv2Config`.
        vocab_sizes: feature → vocabulary size (reserved ids included), from the feature map.
        task_names: label columns, e.g. ``("click",)``; one logit each.
        embedding_device: where the tables are created (``"meta"`` before sharding).
        item_vectors: ``[V, d]`` item-vector matrix (row = ``item_id``), required when
            ``config.multimodal`` switches a feature on; kept as a non-trainable buffer.

    Shapes:
        ``forward(batch) → [B, T]`` logits (``forward_inputs(embed(batch))``, see :class:`Ranker`).

    Example:
        >>> model = DCNv2(DCNv2Config.tiny(), vocab_sizes, batch.task_names)
        >>> batch.batch_size, batch.task_names, model(batch).shape
        (16, ('in_history', 'parity'), torch.Size([16, 2]))
    """

    def __init__(self, config: DCNv2Config, vocab_sizes: Mapping[str, int], task_names: Sequence[str],
                 embedding_device: torch.device | str | None = None,
                 item_vectors: torch.Tensor | None = None) -> None:
        super().__init__(config, vocab_sizes, task_names)
        self.input = FlatInput(self.spec, config.history, embedding_device,
                               multimodal=build_multimodal(config.multimodal, item_vectors, self.spec, "DCNv2Config"))
        d = self.input.output_dim
        self.cross = build_cross_net(config.cross_type, d, config.num_cross_layers, config.low_rank,
                                     config.num_experts)
        # Stacked: the deep net reads the cross output; parallel: both read x0 and their outputs are joined.
        self.deep = MLP(d, config.deep_hidden, dropout=config.dropout)
        head_in = self.deep.out_features if config.structure == "stacked" else d + self.deep.out_features
        self.heads = TaskHeads(head_in, len(self.task_names), config.tower_hidden, config.dropout)

    def embed(self, batch: CTRBatch) -> CTRInputs:
        return self.input.features(batch)

    def forward_inputs(self, inputs: CTRInputs) -> torch.Tensor:
        x0 = self.input.forward_inputs(inputs)
        if self.config.structure == "stacked":
            h = self.deep(self.cross(x0))
        else:
            h = torch.cat([self.cross(x0), self.deep(x0)], dim=1)
        return self.heads(h)
