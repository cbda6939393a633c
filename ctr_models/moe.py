"""Mixture-of-experts rankers: MMoE and the multi-embedding MoE with cross-expert de-correlation.

* :class:`MMoE` (Ma et al., KDD 2018): shared MLP experts ``f_i``, one softmax gate per task
  ``g^k(x) = softmax(W_k x)`` and one tower per task: ``y_k = h^k(Σ_i g^k(x)_i f_i(x))``.
* :class:`MultiEmbeddingMoE` (multi-embedding paradigm, Guo et al., ICML 2024; de-correlation after
  Wang et al., arXiv 2505.17925): ``K`` experts, each with its **own embedding tables** and its own
  interaction module (a DCN-v2 cross network followed by an MLP — the non-linearity after the interaction
  matters, without it the sets collapse back into one big embedding), mixed by per-task gates. An auxiliary
  *cross-expert de-correlation* loss pushes the experts to carry different information, and the
  *cross-expert correlation* of the last batch is exposed as a metric.

Cross-expert correlation (our definition; the D-MoE paper's exact formula was not available, see the
reference notes §2c): for expert outputs ``h_k ∈ R^{B×H}`` standardise every unit over the batch,
``z_k = (h_k − mean) / std``, and take the cross-correlation matrices ``C_jk = z_j^T z_k / B ∈ R^{H×H}``
(Pearson correlations between every unit of expert ``j`` and every unit of expert ``k``). Then

* metric ``ρ̄ = mean_{j<k} mean_{a,b} |C_jk[a,b]|`` — with ``H = 1`` this is the mean absolute Pearson
  correlation between scalar expert outputs;
* loss ``L_dec = mean_{j<k} mean_{a,b} C_jk[a,b]²`` (smooth), added to the BCE as ``λ · L_dec``.

Pearson on a small batch is noisy: even independent experts show ``ρ̄ ≈ sqrt(2 / (π B))``; keep ``λ`` small
(de-correlating too hard fights the BCE, which wants every expert to predict the label).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from hybrid.core import CTRBatch
from hybrid.ctr_models._config import (
    freeze_lists,
    require,
    require_choice,
    require_positive_ints,
)
from hybrid.ctr_models.base import Ranker
from hybrid.ctr_models.dcn_v2 import CROSS_TYPES, build_cross_net
from hybrid.ctr_models.features import CTRInputs, FeatureConfig, FeatureSpec
from hybrid.ctr_models.history import HistoryConfig
from hybrid.ctr_models.inputs import FlatInput
from hybrid.ctr_models.layers import MLP, TaskHeads
from hybrid.ctr_models.multimodal import MultimodalConfig, build_multimodal


def cross_expert_correlation(expert_outputs: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """De-correlation loss and correlation metric of ``K`` experts on one batch (module docstring).

    Args:
        expert_outputs: ``[K, B, H]`` (or ``[K, B]`` for scalar experts).
        eps: added to the standard deviation; a dead unit (constant over the batch) counts as uncorrelated.

    Returns:
        ``(loss, metric)`` scalars: mean squared and mean absolute cross-correlation over expert pairs
        ``j < k``. Both are 0 for ``K < 2`` or ``B < 2``.

    Example:
        >>> x = torch.randn(1, 256, 1)
        >>> loss, corr = cross_expert_correlation(torch.cat([x, x]))   # two identical experts
        >>> round(float(corr), 3)
        1.0
    """
    h = expert_outputs if expert_outputs.dim() == 3 else expert_outputs.unsqueeze(-1)
    K, B, H = h.shape
    zero = h.new_zeros(())
    if K < 2 or B < 2:
        return zero, zero
    z = (h - h.mean(1, keepdim=True)) / (h.std(1, unbiased=False, keepdim=True) + eps)
    corr = torch.einsum("ibh,jbg->ijhg", z, z) / B                   # [K, K, H, H]
    j, k = torch.triu_indices(K, K, offset=1, device=h.device)
    pairs = corr[j, k]                                                # [P, H, H]
    return pairs.pow(2).mean(), pairs.abs().mean()


def _gate_entropy(gates: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of gate distributions ``[..., K]``; near 0 means the gate collapsed to one expert."""
    return -(gates * gates.clamp(min=1e-12).log()).sum(-1).mean()


def _check_mixture_fields(config: "MMoEConfig | MultiEmbeddingMoEConfig", name: str) -> None:
    """The checks both MoE configs share (expert / gate / tower sizes, dropout, ``λ``); ``name`` is the
    config class named in the error."""
    require_positive_ints(config.expert_hidden, name, "expert_hidden", allow_empty=False)
    require_positive_ints(config.gate_hidden, name, "gate_hidden")
    require_positive_ints(config.tower_hidden, name, "tower_hidden")
    require(0.0 <= config.dropout < 1.0, name, "dropout", f"must be in [0, 1), got {config.dropout}")
    require(config.decorrelation_weight >= 0, name, "decorrelation_weight",
            f"must be >= 0, got {config.decorrelation_weight}")


@dataclass(frozen=True)
class MMoEConfig:
    """Configuration of :class:`MMoE`.

    Args:
        features: embedding/feature settings.
        history: history encoder.
        num_experts: shared experts (>= 1; 1 makes every gate trivial).
        expert_hidden: hidden sizes of each expert MLP (the last one is the expert output width).
        gate_hidden: hidden sizes of each task's gate before its softmax (``()`` = linear gate, as the paper).
        tower_hidden: hidden sizes of each task tower.
        dropout: dropout inside experts and towers.
        decorrelation_weight: ``λ`` of the optional cross-expert de-correlation loss (0 disables it; the
            correlation metric is logged either way).
        multimodal: SimTier / MNSE / MK-MMD over item vectors (appended to ``x0``; off by default).
    """

    features: FeatureConfig = field(default_factory=FeatureConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    num_experts: int = 4
    expert_hidden: tuple[int, ...] = (256, 128)
    gate_hidden: tuple[int, ...] = ()
    tower_hidden: tuple[int, ...] = (64,)
    dropout: float = 0.0
    decorrelation_weight: float = 0.0
    multimodal: MultimodalConfig = field(default_factory=MultimodalConfig)

    def __post_init__(self) -> None:
        freeze_lists(self)
        name = "MMoEConfig"
        require(self.num_experts >= 1, name, "num_experts", f"must be >= 1, got {self.num_experts}")
        _check_mixture_fields(self, name)

    @classmethod
    def tiny(cls) -> "MMoEConfig":
        return cls(features=FeatureConfig.tiny(), history=HistoryConfig.tiny(), num_experts=3,
                   expert_hidden=(32, 16), tower_hidden=(8,))


class TaskGates(nn.ModuleList):
    """One softmax gate per task over ``K`` experts, and the per-task mixtures of the expert outputs.

    Gate ``t`` is ``g^t(x) = softmax(W_t MLP_t(x))`` (module docstring); element ``t`` of the list is
    ``Sequential(MLP_t, Linear(·, K))``, so on a ranker the parameters are named ``gates.<t>.0.…`` (the MLP)
    and ``gates.<t>.1.weight`` / ``.bias``.

    Args:
        in_features: width ``d`` of the gate input.
        num_experts: ``K``.
        num_tasks: ``T``, one gate per task.
        hidden: hidden sizes of each gate's MLP before its linear layer (``()`` = linear gate, as the paper).

    Shapes:
        ``forward(x [B, d], experts [K, B, H]) → (mixed [B, T, H], gates [B, T, K])`` with
        ``mixed[:, t] = Σ_k gates[:, t, k] · experts[k]`` and ``gates.sum(-1) == 1``.

    Example:
        >>> gates = TaskGates(8, num_experts=3, num_tasks=2)
        >>> mixed, g = gates(torch.randn(4, 8), torch.randn(3, 4, 16))
        >>> mixed.shape, g.shape
        (torch.Size([4, 2, 16]), torch.Size([4, 2, 3]))
    """

    def __init__(self, in_features: int, num_experts: int, num_tasks: int, hidden: tuple[int, ...] = ()) -> None:
        super().__init__()
        for _ in range(num_tasks):
            mlp = MLP(in_features, hidden)
            self.append(nn.Sequential(mlp, nn.Linear(mlp.out_features, num_experts)))

    def forward(self, x: torch.Tensor, experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gates = torch.stack([torch.softmax(g(x), -1) for g in self], 1)           # [B, T, K]
        return torch.einsum("btk,kbh->bth", gates, experts), gates


class _MoEMixin:
    """Per-task gates and towers over the experts, and the shared auxiliary-loss / metric plumbing of the MoE
    rankers: ``__init__`` builds its experts, then calls :meth:`_build_mixture`; ``forward`` computes the
    expert outputs and returns :meth:`_mix`."""

    gates: TaskGates
    heads: TaskHeads
    _last_experts: torch.Tensor | None
    _last_gates: torch.Tensor | None
    _decorrelation_weight: float

    def _build_mixture(self, gate_in_features: int, config: "MMoEConfig | MultiEmbeddingMoEConfig") -> None:
        """Gates on a ``[B, gate_in_features]`` input and one tower per task on the ``expert_hidden[-1]``-wide
        mixtures. Call it after building the experts: the init order fixes the weights under a seed."""
        num_tasks = len(self.task_names)  # type: ignore[attr-defined]
        self.gates = TaskGates(gate_in_features, config.num_experts, num_tasks, config.gate_hidden)
        self.heads = TaskHeads(config.expert_hidden[-1], num_tasks, config.tower_hidden, config.dropout)
        self._decorrelation_weight = config.decorrelation_weight
        self._last_experts = self._last_gates = None

    def _mix(self, experts: torch.Tensor, gate_in: torch.Tensor) -> torch.Tensor:
        """``experts [K, B, H]``, ``gate_in [B, d] → logits [B, T]``: task ``t``'s tower on its own mixture."""
        mixed, gates = self.gates(gate_in, experts)                                # [B, T, H], [B, T, K]
        # Keep the graph: auxiliary_losses() is called after forward, in the same step.
        self._last_experts, self._last_gates = experts, gates
        return self.heads(mixed, per_task_input=True)

    def auxiliary_losses(self) -> dict[str, torch.Tensor]:
        """``{"decorrelation": λ · L_dec}`` of the last forward, in training mode with ``λ > 0``; else ``{}``."""
        out = super().auxiliary_losses()  # type: ignore[misc]  (the multimodal loss, see Ranker)
        training = self.training  # type: ignore[attr-defined]
        if self._decorrelation_weight <= 0 or self._last_experts is None or not training:
            return out
        loss, _ = cross_expert_correlation(self._last_experts)
        return {**out, "decorrelation": self._decorrelation_weight * loss}

    def logging_metrics(self) -> dict[str, float]:
        out = super().logging_metrics()  # type: ignore[misc]
        if self._last_experts is None or self._last_gates is None:
            return out
        with torch.no_grad():
            _, corr = cross_expert_correlation(self._last_experts.detach())
            out["moe/cross_expert_corr"] = float(corr)
            for t, name in enumerate(self.task_names):  # type: ignore[attr-defined]
                out[f"moe/gate_entropy/{name}"] = float(_gate_entropy(self._last_gates[:, t].detach()))
        return out


class MMoE(_MoEMixin, Ranker):
    """Multi-gate mixture of experts over ``x0 = [field embeddings; history; dense]``.

    Args:
        config: :class:`MMoEConfig`.
        vocab_sizes: feature → vocabulary size (reserved ids included).
        task_names: one tower and one gate per task, e.g. ``("click", "rating5")``.
        embedding_device: where the tables are created.

    Shapes:
        ``forward(batch) → [B, T]``; internally experts ``[K, B, H]``, gates ``[B, T, K]``.

    Example:
        >>> model = MMoE(MMoEConfig.tiny(), vocab_sizes, batch.task_names)     # two tasks: two gates, two towers
        >>> logits = model(batch)                                               # [B, 2]
        >>> loss = bce(logits, batch.labels) + sum(model.auxiliary_losses().values())
        >>> 0.0 <= model.logging_metrics()["moe/cross_expert_corr"] <= 1.0
        True
    """

    def __init__(self, config: MMoEConfig, vocab_sizes: Mapping[str, int], task_names: Sequence[str],
                 embedding_device: torch.device | str | None = None,
                 item_vectors: torch.Tensor | None = None) -> None:
        super().__init__(config, vocab_sizes, task_names)
        self.input = FlatInput(self.spec, config.history, embedding_device,
                               multimodal=build_multimodal(config.multimodal, item_vectors, self.spec, "MMoEConfig"))
        d = self.input.output_dim
        self.experts = nn.ModuleList(MLP(d, config.expert_hidden, dropout=config.dropout)
                                     for _ in range(config.num_experts))
        self._build_mixture(d, config)

    def embed(self, batch: CTRBatch) -> CTRInputs:
        return self.input.features(batch)

    def forward_inputs(self, inputs: CTRInputs) -> torch.Tensor:
        x = self.input.forward_inputs(inputs)
        experts = torch.stack([e(x) for e in self.experts], 0)                     # [K, B, H]
        return self._mix(experts, x)


@dataclass(frozen=True)
class MultiEmbeddingMoEConfig:
    """Configuration of :class:`MultiEmbeddingMoE`.

    Args:
        features: embedding/feature settings (every expert gets its own tables of this layout).
        history: history encoder (one per expert, on that expert's embeddings).
        num_experts: ``K`` embedding sets / interaction experts (>= 2 for de-correlation to mean anything).
        cross_type: interaction of each expert: DCN-v2 ``"full"``, ``"low_rank"`` or ``"mixture"``.
        num_cross_layers: cross layers per expert.
        low_rank: rank for low-rank crosses (``None`` = d // 4).
        cross_num_experts: low-rank experts inside each cross network when ``cross_type="mixture"``.
        expert_hidden: MLP after each expert's cross network (the last size is the expert output ``H``).
        gate_hidden: hidden sizes of each task's gate; the gate reads the mean of the experts' ``x0``.
        tower_hidden: hidden sizes of each task tower.
        dropout: dropout in the expert MLPs and towers.
        decorrelation_weight: ``λ`` of the cross-expert de-correlation loss.
        multimodal: SimTier / MNSE / MK-MMD over item vectors, computed once and appended to every
            expert's ``x0``; MK-MMD aligns the projected vectors with every expert's item table (mean).
    """

    features: FeatureConfig = field(default_factory=FeatureConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    num_experts: int = 4
    cross_type: str = "low_rank"
    num_cross_layers: int = 2
    low_rank: int | None = None
    cross_num_experts: int = 4
    expert_hidden: tuple[int, ...] = (128, 64)
    gate_hidden: tuple[int, ...] = ()
    tower_hidden: tuple[int, ...] = (64,)
    dropout: float = 0.0
    decorrelation_weight: float = 0.01
    multimodal: MultimodalConfig = field(default_factory=MultimodalConfig)

    def __post_init__(self) -> None:
        freeze_lists(self)
        name = "MultiEmbeddingMoEConfig"
        require(self.num_experts >= 1, name, "num_experts", f"must be >= 1, got {self.num_experts}")
        require_choice(self.cross_type, CROSS_TYPES, name, "cross_type")
        require(self.num_cross_layers >= 1, name, "num_cross_layers", f"must be >= 1, got {self.num_cross_layers}")
        require(self.low_rank is None or self.low_rank >= 1, name, "low_rank",
                f"must be >= 1 or None, got {self.low_rank}")
        require(self.cross_num_experts >= 1, name, "cross_num_experts",
                f"must be >= 1, got {self.cross_num_experts}")
        _check_mixture_fields(self, name)

    @classmethod
    def tiny(cls) -> "MultiEmbeddingMoEConfig":
        return cls(features=FeatureConfig.tiny(), history=HistoryConfig.tiny(), num_experts=2,
                   expert_hidden=(16,), tower_hidden=(8,))


class InteractionExpert(nn.Module):
    """One expert of :class:`MultiEmbeddingMoE`: its own embedding set → x0 → cross network → MLP.

    Args:
        spec: feature layout (tables are created anew: each expert owns ``t_<feature>`` tables).
        config: the MoE config (history, cross, hidden sizes).
        embedding_device: where the tables are created.

    Shapes:
        ``forward(batch) → (x0 [B, d], h [B, H])``.

    Example:
        >>> expert = InteractionExpert(spec, MultiEmbeddingMoEConfig.tiny())
        >>> x0, h = expert(batch)
        >>> x0.shape == (16, expert.input.output_dim)
        True
    """

    def __init__(self, spec: FeatureSpec, config: MultiEmbeddingMoEConfig,
                 embedding_device: torch.device | str | None = None, extra_dim: int = 0) -> None:
        super().__init__()
        self.input = FlatInput(spec, config.history, embedding_device, extra_dim=extra_dim)
        d = self.input.output_dim
        self.cross = build_cross_net(config.cross_type, d, config.num_cross_layers, config.low_rank,
                                     config.cross_num_experts)
        self.mlp = MLP(d, config.expert_hidden, dropout=config.dropout)

    def forward(self, batch: CTRBatch) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = self.input(batch)
        return x0, self.interact(x0)

    def interact(self, x0: torch.Tensor) -> torch.Tensor:
        """``x0 [B, d] → h [B, H]`` (cross network, then MLP)."""
        return self.mlp(self.cross(x0))


class MultiEmbeddingMoE(_MoEMixin, Ranker):
    """Multi-embedding MoE: ``K`` (embedding set, interaction) experts, per-task gates, de-correlation loss.

    Args:
        config: :class:`MultiEmbeddingMoEConfig`.
        vocab_sizes: feature → vocabulary size.
        task_names: label columns.
        embedding_device: where the tables are created.

    Shapes:
        ``forward(batch) → [B, T]``. Tables live at ``experts.<k>.input.features.ec.embeddings.t_<f>``;
        :meth:`embed` returns one ``CTRInputs`` per expert, :meth:`forward_inputs` takes that list.

    Example:
        >>> model = MultiEmbeddingMoE(MultiEmbeddingMoEConfig.tiny(), vocab_sizes, batch.task_names)
        >>> loss = bce(model(batch), batch.labels) + model.auxiliary_losses()["decorrelation"]
        >>> len(model.experts), bool(torch.isfinite(loss))
        (2, True)
    """

    multi_embedding = True

    def __init__(self, config: MultiEmbeddingMoEConfig, vocab_sizes: Mapping[str, int],
                 task_names: Sequence[str], embedding_device: torch.device | str | None = None,
                 item_vectors: torch.Tensor | None = None) -> None:
        super().__init__(config, vocab_sizes, task_names)
        # One multimodal module for all K embedding sets (computed once; MK-MMD sees every set's item
        # embeddings), so it sits here and the experts' FlatInputs take its output as extra features.
        self.multimodal = build_multimodal(config.multimodal, item_vectors, self.spec, "MultiEmbeddingMoEConfig")
        extra_dim = self.multimodal.output_dim if self.multimodal is not None else 0
        self.experts = nn.ModuleList(InteractionExpert(self.spec, config, embedding_device, extra_dim)
                                     for _ in range(config.num_experts))
        self._build_mixture(self.experts[0].input.output_dim, config)

    def embed(self, batch: CTRBatch) -> list[CTRInputs]:
        """One :class:`CTRInputs` per expert, each from that expert's own tables."""
        return [e.input.features(batch) for e in self.experts]

    def forward_inputs(self, inputs: list[CTRInputs]) -> torch.Tensor:
        if len(inputs) != len(self.experts):
            raise ValueError(f"MultiEmbeddingMoE.forward_inputs: expected one CTRInputs per expert "
                             f"({len(self.experts)}), got {len(inputs)}")
        # The multimodal features are computed once; MK-MMD sees every expert's item embeddings.
        extra = self.multimodal(inputs) if self.multimodal is not None else None
        x0s = tuple(e.input.flatten(x, extra) for e, x in zip(self.experts, inputs))
        hs = tuple(e.interact(x0) for e, x0 in zip(self.experts, x0s))
        experts = torch.stack(hs, 0)                                               # [K, B, H]
        # The gate sees every embedding set (their mean), so no set is privileged.
        return self._mix(experts, torch.stack(x0s, 0).mean(0))
