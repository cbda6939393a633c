"""The flat input vector ``x0 = [e_1; …; e_F; history; multimodal; dense]`` of DCN-v2 and the MoE rankers."""
from __future__ import annotations

import torch
from torch import nn

from hybrid.core import CTRBatch
from hybrid.ctr_models.features import CTRFeatures, CTRInputs, FeatureSpec
from hybrid.ctr_models.history import HistoryConfig, build_history_encoder
from hybrid.ctr_models.multimodal import MultimodalFeatures


class FlatInput(nn.Module):
    """Embeds a batch; concatenates field embeddings, the encoded history, multimodal features and dense features.

    Args:
        spec: feature layout.
        history: how to encode the history (ignored when the layout has no history).
        embedding_device: where the embedding tables are created (``"meta"`` for sharded models).
        multimodal: the ranker's multimodal features
            (:func:`~hybrid.ctr_models.multimodal.build_multimodal`); this module owns them
            (``self.multimodal``), computes them from its own embeddings and appends them to ``x0``. ``None``: none.
        extra_dim: width of extra features computed *outside* this module and passed to :meth:`flatten`
            (the multi-embedding MoE computes its multimodal features once for all of its embedding sets);
            0 = none. Not together with ``multimodal``.

    Shapes:
        ``CTRBatch → [B, output_dim]`` (:meth:`forward_inputs`: ``CTRInputs → [B, output_dim]``) with
        ``output_dim = F·D + H + M + extra_dim + num_dense`` (``H`` = the history encoder's ``output_dim``, 0
        without one; ``M`` = the multimodal features' ``output_dim``).

    Example:
        >>> flat = FlatInput(spec, HistoryConfig(encoder="pooled"))
        >>> flat(batch).shape == (batch.batch_size, flat.output_dim)
        True
    """

    def __init__(self, spec: FeatureSpec, history: HistoryConfig,
                 embedding_device: torch.device | str | None = None, *,
                 multimodal: MultimodalFeatures | None = None, extra_dim: int = 0) -> None:
        super().__init__()
        self.features = CTRFeatures(spec, device=embedding_device)
        self.history_encoder = build_history_encoder(history, spec.embedding_dim) if spec.has_history else None
        if isinstance(self.history_encoder, nn.Module) and history.encoder == "target" and not spec.has_target:
            raise ValueError("HistoryConfig.encoder: 'target' needs a candidate field that also has a history "
                             "(e.g. item_id with hist_item_id); FeatureSpec.target_fields is empty")
        self.multimodal = multimodal
        if self.multimodal is not None and extra_dim:
            raise ValueError("FlatInput: multimodal features are computed here or passed in as extra, not both")
        hist_dim = self.history_encoder.output_dim if self.history_encoder is not None else 0
        self.extra_dim = extra_dim + (self.multimodal.output_dim if self.multimodal is not None else 0)
        self.output_dim = spec.num_fields * spec.embedding_dim + hist_dim + self.extra_dim + spec.num_dense

    def forward(self, batch: CTRBatch) -> torch.Tensor:
        return self.forward_inputs(self.features(batch))

    def forward_inputs(self, inputs: CTRInputs) -> torch.Tensor:
        """``x0`` from already embedded inputs (this module's multimodal features computed from them)."""
        extra = self.multimodal(inputs) if self.multimodal is not None else None
        return self.flatten(inputs, extra)

    def flatten(self, inputs: CTRInputs, extra: torch.Tensor | None = None) -> torch.Tensor:
        """``x0`` from already embedded inputs and the extra features (``[B, extra_dim]``, or ``None``)."""
        if (extra.shape[1] if extra is not None else 0) != self.extra_dim:
            raise ValueError(f"FlatInput: expected extra features of width {self.extra_dim}, got "
                             f"{None if extra is None else list(extra.shape)}")
        parts = [inputs.fields.flatten(1)]
        if self.history_encoder is not None:
            parts.append(self.history_encoder(inputs.history, inputs.mask, inputs.target, inputs.history_timestamps))
        if extra is not None:
            parts.append(extra)
        parts.append(inputs.dense)
        return torch.cat(parts, dim=1)
