"""Export a ranker for serving: its tables as plain weights looked up on padded ids, traced by ``torch.export``.

:class:`ServingRanker` is a frozen copy of a built-in ranker whose TorchRec collections are replaced by plain
tensors (every table of every embedding set — the ``K`` sets of the multi-embedding MoE included — copied
into a parameter) and whose ``forward`` takes seven plain tensors instead of a ``CTRBatch``. It rebuilds the
ranker's :class:`~hybrid.ctr_models.features.CTRInputs` exactly as
:class:`~hybrid.ctr_models.features.CTRFeatures` does (PAD rows zeroed, bags mean-pooled over their real ids
with an empty bag giving zeros, the most recent ``max_len`` events right-padded, target = sum of the target
fields) and runs the ranker's own body (``Ranker.forward_inputs``) on them, so eager and served logits agree
to float rounding (bit for bit on CPU in the tests: bags go through the same ``embedding_bag`` kernel as
TorchRec's). :func:`export_ranker` traces it with ``torch.export`` (one dynamic batch dimension),
:func:`save_exported` writes the ``.pt2`` program and a JSON sidecar describing its inputs,
:func:`load_exported` reads both back.

Why plain weights and not TorchRec's inference path: TorchRec serves through a quantised
``EmbeddingCollection`` packaged with ``torch.package`` behind a predict factory, which needs fbgemm's
inference operators in the serving runtime, and its ``KeyedJaggedTensor`` inputs have data-dependent shapes
(values length = the sum of the lengths) that ``torch.export`` cannot trace on CPU with torchrec 1.8. Plain
weights with padded ids are ordinary ``aten`` embedding lookups: the program loads in any PyTorch runtime
(``torch.export.load``, AOTInductor) with no TorchRec or fbgemm installed. The cost is padding (histories
are ``max_len`` wide, bags as wide as the widest bag of the request) and full fp32 tables in the program.

Serving inputs, in order (:data:`INPUT_NAMES`; ``B`` = batch size, dynamic; PAD id = 0):

==================  =================  ======  ==============================================================
name                shape              dtype   content
==================  =================  ======  ==============================================================
``single_ids``      ``[B, S]``         int64   one id per single-valued field, ``spec.single_fields`` order
``multi_ids``       ``[B, M, L]``      int64   each multi-valued field's ids (``spec.multi_fields`` order),
                                               right-padded with 0 to a common ``L`` (dynamic, >= 1);
                                               mean over the non-zero ids, zeros for an empty bag
``hist_ids``        ``[B, H, T]``      int64   ``spec.history_fields`` (``hist_<name>``), the most recent
                                               ``T = max_len`` events, chronological, right-padded
``hist_lengths``    ``[B]``            int64   real events in ``hist_ids`` (``<= T``; positions beyond are
                                               ignored)
``hist_timestamps`` ``[B, T]``         int64   event times (seconds), laid out as ``hist_ids``
``timestamps``      ``[B]``            int64   the candidate's request time
``dense``           ``[B, num_dense]`` float32 ``CTRBatch.dense``
==================  =================  ======  ==============================================================

Output: ``logits [B, num_tasks]`` float32, ``task_names`` order. A layout without multi-valued fields takes
``multi_ids`` of shape ``[B, 0, 1]``, one without history ``hist_ids [B, 0, T]`` (and zero lengths).

Multimodal features (SimTier, MNSE, the projected item vector) export with the item vectors as a buffer of
the program; their cosines are computed directly (the eager path gathers them from a cached ``V × V`` table
keyed on the buffer's address, which cannot be traced), which changes them by float rounding only. MK-MMD is
a training loss and is not part of the program.

Example:
    >>> from hybrid.ctr_models import DCNv2Config, build_ranker
    >>> model = build_ranker("dcn_v2", DCNv2Config.tiny(), vocab_sizes, batch.task_names).eval()
    >>> inputs = serving_inputs(model, batch)
    >>> [name for name, _ in zip(INPUT_NAMES, inputs)] == list(INPUT_NAMES)
    True
    >>> program = export_ranker(model, batch)
    >>> bool((program.module()(*inputs) - model(batch)).abs().max() < 1e-6)
    True
"""
from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection

from hybrid.core import CTRBatch
from hybrid.core.feature_map import PAD_ID, table_name
from hybrid.core.jagged import jagged_to_padded, lengths_to_mask
from hybrid.ctr_models.base import Ranker
from hybrid.ctr_models.features import CTRFeatures, CTRInputs, FeatureSpec
from hybrid.ctr_models.multimodal import MultimodalFeatures

#: Positional inputs of :class:`ServingRanker` and of the exported program (module docstring).
INPUT_NAMES: tuple[str, ...] = ("single_ids", "multi_ids", "hist_ids", "hist_lengths", "hist_timestamps",
                                "timestamps", "dense")
#: ``format`` of the JSON sidecar :func:`save_exported` writes.
SIDECAR_FORMAT = "hybrid-serving-ranker/1"
# Warning torch.export emits for the last-forward diagnostics the rankers keep as plain attributes (attention
# weights, gates); export restores them and they are not outputs of the program.
_ATTRIBUTE_WARNING = r"The tensor attributes? .* (was|were) assigned during export"


class ServingInputs(NamedTuple):
    """The seven tensors :class:`ServingRanker` takes (module docstring), by name; a tuple, so
    ``serving(*inputs)`` works."""

    single_ids: torch.Tensor
    multi_ids: torch.Tensor
    hist_ids: torch.Tensor
    hist_lengths: torch.Tensor
    hist_timestamps: torch.Tensor
    timestamps: torch.Tensor
    dense: torch.Tensor


def _ranker_name(model: nn.Module) -> str:
    return type(model).__name__


def _table_weights(features: CTRFeatures, ranker: str) -> dict[str, torch.Tensor]:
    """``t_<feature> → weight`` of one embedding set; ``ValueError`` for collections that are not plain TorchRec
    ones on a real device."""
    weights: dict[str, torch.Tensor] = {}
    for collection, attr in ((features.ec, "embeddings"), (features.ebc, "embedding_bags")):
        if collection is None:
            continue
        if not isinstance(collection, (EmbeddingCollection, EmbeddingBagCollection)):
            raise ValueError(f"ServingRanker({ranker}): the tables are held by {type(collection).__name__}, not an "
                             "unsharded TorchRec collection; export from an unsharded model (load the "
                             "checkpoint into build_ranker(...) on one device)")
        for name, module in getattr(collection, attr).items():
            if module.weight.device.type == "meta":
                raise ValueError(f"ServingRanker({ranker}): table {name!r} is on the meta device (built with "
                                 "embedding_device='meta' and never materialised); load its weights first")
            weights[name] = module.weight
    return weights


def _without_transient_state(model: nn.Module) -> dict[int, Any]:
    """A ``deepcopy`` memo that maps the tensors modules keep from their last forward (attention weights,
    gates, the cosine cache — not parameters or buffers) to ``None``: they may carry an autograd graph, which
    ``deepcopy`` refuses, and are rebuilt by the next forward."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) or (
                    isinstance(value, tuple) and any(isinstance(v, torch.Tensor) for v in value)):
                memo[id(value)] = None
    return memo


class ServingRanker(nn.Module):
    """A frozen, eval-mode copy of a ranker that reads plain padded tensors (module docstring) — what is exported.

    Args:
        model: a built-in :class:`~hybrid.ctr_models.base.Ranker` (unsharded, tables materialised). It is
            copied: training it afterwards does not change this module, and its mode is left as it was.

    Every table of every embedding set becomes a parameter ``tables.<set>.t_<feature>`` (state-dict keys of
    the original ranker are not kept: this module is for serving, not for training or checkpoints); the body
    is the ranker's own dense modules (``ranker.*``) run by ``Ranker.forward_inputs``. Parameters keep the
    ranker's ``requires_grad`` flags: ``torch.matmul`` chooses how to fold batched products by them, so
    freezing the copy would move its logits by float rounding (the program is run under ``no_grad`` anyway).

    Raises:
        ValueError: not a built-in ranker, sharded or meta-device tables, or no TorchRec embedding module.

    Shapes:
        ``forward(single_ids [B, S], multi_ids [B, M, L], hist_ids [B, H, T], hist_lengths [B],
        hist_timestamps [B, T], timestamps [B], dense [B, num_dense]) → logits [B, num_tasks]``.

    Example:
        >>> from hybrid.ctr_models import TINConfig, build_ranker
        >>> model = build_ranker("tin", TINConfig.tiny(), vocab_sizes, batch.task_names).eval()
        >>> serving = ServingRanker(model)
        >>> sorted(serving.tables[0].keys())[:2]
        ['t_action', 't_age']
        >>> torch.allclose(serving(*serving_inputs(model, batch)), model(batch), atol=1e-6)
        True
    """

    def __init__(self, model: Ranker) -> None:
        super().__init__()
        if not isinstance(model, Ranker):
            raise ValueError(f"ServingRanker: expected a built-in Ranker (hybrid.ctr_models.build_ranker), got "
                             f"{type(model).__name__}; unwrap DistributedModelParallel / DDP first")
        ranker = _ranker_name(model)
        sets = model.feature_sets()
        if not sets or (len(sets) > 1 and not model.multi_embedding):
            raise ValueError(f"ServingRanker({ranker}): expected one CTRFeatures embedding set (one per expert for "
                             f"the multi-embedding MoE), found {len(sets)}")
        self.spec: FeatureSpec = model.spec
        self.task_names: tuple[str, ...] = model.task_names
        self.ranker_name = ranker
        self.multi_embedding = model.multi_embedding
        self.tables = nn.ModuleList()
        for features in sets:
            weights = _table_weights(features, ranker)
            missing = sorted(set(self.spec.table_sizes) - set(weights))
            if missing:
                raise ValueError(f"ServingRanker({ranker}): no table for {missing} in an embedding set")
            self.tables.append(nn.ParameterDict({name: nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
                                                 for name, w in weights.items()}))
        # The body: a copy of the ranker without its TorchRec collections (memo: they copy as None).
        memo = _without_transient_state(model)
        for features in sets:
            for collection in (features.ec, features.ebc):
                if collection is not None:
                    memo[id(collection)] = None
        # requires_grad is copied as it is, not cleared: torch.matmul picks how it folds batched products by it
        # (LowRankMixtureCrossNet's), so a frozen copy would differ from the eager ranker by float rounding.
        self.ranker = copy.deepcopy(model, memo).eval()
        for module in self.ranker.modules():
            if isinstance(module, MultimodalFeatures):
                module.traceable = True
        self.eval()

    def train(self, mode: bool = True) -> "ServingRanker":
        if mode:
            raise ValueError("ServingRanker: serving only (eval mode); train the Ranker and copy it again")
        return super().train(False)

    def _check(self, inputs: ServingInputs) -> None:
        """Static checks only (ranks, dtypes, the fixed dimensions), so they hold for every traced batch size."""
        spec = self.spec
        expected = {"single_ids": (2, torch.int64, {1: len(spec.single_fields)}),
                    "multi_ids": (3, torch.int64, {1: len(spec.multi_fields)}),
                    "hist_ids": (3, torch.int64, {1: len(spec.history_fields), 2: spec.max_len}),
                    "hist_lengths": (1, torch.int64, {}),
                    "hist_timestamps": (2, torch.int64, {1: spec.max_len}),
                    "timestamps": (1, torch.int64, {}),
                    "dense": (2, torch.float32, {1: spec.num_dense})}
        for name, value in zip(INPUT_NAMES, inputs):
            ndim, dtype, dims = expected[name]
            if not isinstance(value, torch.Tensor) or value.dim() != ndim or value.dtype != dtype or any(
                    value.shape[d] != n for d, n in dims.items()):
                shape = ", ".join(str(dims.get(d, "B" if d == 0 else "*")) for d in range(ndim))
                got = (f"{value.dtype} {list(value.shape)}" if isinstance(value, torch.Tensor)
                       else type(value).__name__)
                raise ValueError(f"ServingRanker({self.ranker_name}): {name} must be {dtype} [{shape}], got {got}")

    def forward(self, single_ids: torch.Tensor, multi_ids: torch.Tensor, hist_ids: torch.Tensor,
                hist_lengths: torch.Tensor, hist_timestamps: torch.Tensor, timestamps: torch.Tensor,
                dense: torch.Tensor) -> torch.Tensor:
        inputs = ServingInputs(single_ids, multi_ids, hist_ids, hist_lengths, hist_timestamps, timestamps, dense)
        self._check(inputs)
        views = [self._views(tables, inputs) for tables in self.tables]
        return self.ranker.forward_inputs(views if self.multi_embedding else views[0])

    def _views(self, tables: nn.ParameterDict, x: ServingInputs) -> CTRInputs:
        """The :class:`CTRInputs` ``CTRFeatures`` would produce for the same batch, from one embedding set."""
        spec = self.spec

        def rows(feature: str, ids: torch.Tensor) -> torch.Tensor:
            weight = tables[table_name(feature)]
            # PAD ids contribute zero, as in CTRFeatures (the tables have no padding_idx)
            return F.embedding(ids, weight) * (ids != PAD_ID).unsqueeze(-1).to(weight.dtype)

        field_ids = {f: x.single_ids[:, i] for i, f in enumerate(spec.single_fields)}
        singles = {f: rows(f, ids) for f, ids in field_ids.items()}
        fields = list(singles.values())
        if spec.multi_fields:
            B, _, L = x.multi_ids.shape
            # one bag every L ids; arange(B) · L, not arange(0, B·L, L), keeps the bag count the batch symbol
            offsets = torch.arange(B, device=x.multi_ids.device) * L
        for m, f in enumerate(spec.multi_fields):
            # the kernel EmbeddingBagCollection runs (nn.EmbeddingBag, mean; a plain sum / count rounds
            # differently), with the PAD entries left out of sum and count: the same values bit for bit, and an
            # empty bag gives zeros
            fields.append(F.embedding_bag(x.multi_ids[:, m].reshape(-1), tables[table_name(f)], offsets,
                                          mode="mean", padding_idx=PAD_ID))
        target = torch.stack([singles[f] for f in spec.target_fields], 0).sum(0) if spec.has_target else None

        history = mask = lengths = hist_ts = None
        by_field: dict[str, torch.Tensor] = {}
        history_ids: dict[str, torch.Tensor] = {}
        if spec.has_history:
            mask = lengths_to_mask(x.hist_lengths, spec.max_len)
            # what lies beyond a row's length is padding, whatever the caller put there
            ids = x.hist_ids.masked_fill(~mask.unsqueeze(1), PAD_ID)
            history_ids = {f: ids[:, h] for h, f in enumerate(spec.history_fields)}
            by_field = {f: rows(f, history_ids[f]) for f in spec.history_fields}
            history = torch.stack(list(by_field.values()), 0).sum(0)
            lengths = mask.sum(1)
            hist_ts = x.hist_timestamps.masked_fill(~mask, 0)
        return CTRInputs(fields=torch.stack(fields, dim=1), field_names=spec.single_fields + spec.multi_fields,
                         target=target, history=history, history_by_field=by_field, mask=mask, lengths=lengths,
                         history_timestamps=hist_ts, timestamps=x.timestamps, dense=x.dense,
                         field_ids=field_ids, history_ids=history_ids)


def serving_inputs(model: Ranker | ServingRanker, batch: CTRBatch) -> ServingInputs:
    """A :class:`~hybrid.core.CTRBatch` as the seven padded tensors of the serving signature (module docstring).

    Args:
        model: the ranker (or its :class:`ServingRanker`): its feature layout decides fields and orders.
        batch: e.g. from :class:`~hybrid.data.batching.CTRBatchConverter` with ``fields=model.spec.kjt_keys``.

    Raises:
        ValueError: a KJT key the ranker reads is missing, a single-valued field has not one id per sample,
            the history keys disagree on lengths, a bag holds the PAD id (TorchRec would pool its row; the
            padded layout cannot say so), ``dense`` has the wrong width, or the history events have no
            timestamps (the serving signature always carries them).

    Example:
        >>> from hybrid.ctr_models import MMoEConfig, build_ranker
        >>> model = build_ranker("mmoe", MMoEConfig.tiny(), vocab_sizes, batch.task_names)
        >>> x = serving_inputs(model, batch)
        >>> x.single_ids.shape, x.hist_ids.shape, x.hist_timestamps.shape
        (torch.Size([16, 7]), torch.Size([16, 3, 8]), torch.Size([16, 8]))
    """
    spec: FeatureSpec = model.spec
    name = model.ranker_name if isinstance(model, ServingRanker) else _ranker_name(model)
    keys = set(batch.sparse.keys())
    missing = [k for k in spec.kjt_keys if k not in keys]
    if missing:
        raise ValueError(f"serving_inputs({name}): CTRBatch.sparse is missing KJT keys {missing} (the ranker reads "
                         f"{list(spec.kjt_keys)})")
    if batch.dense.dim() != 2 or batch.dense.shape[1] != spec.num_dense:
        raise ValueError(f"serving_inputs({name}): CTRBatch.dense must be [B, {spec.num_dense}] "
                         f"(FeatureConfig.num_dense), got {list(batch.dense.shape)}")
    kjt = batch.sparse.to_dict()
    B, T = batch.batch_size, spec.max_len
    device = batch.timestamps.device
    singles = []
    for f in spec.single_fields:
        ids = kjt[f].values()
        if ids.numel() != B or not bool((kjt[f].lengths() == 1).all()):
            raise ValueError(f"serving_inputs({name}): CTRBatch.sparse[{f!r}] is single-valued and needs exactly "
                             f"one id per sample ({B}), got {ids.numel()} ids")
        singles.append(ids.to(torch.int64))
    single_ids = (torch.stack(singles, 1) if singles else torch.zeros(B, 0, dtype=torch.int64, device=device))

    bags = []
    width = max([1] + [int(kjt[f].lengths().max()) for f in spec.multi_fields if kjt[f].lengths().numel()])
    for f in spec.multi_fields:
        values = kjt[f].values().to(torch.int64)
        if bool((values == PAD_ID).any()):
            raise ValueError(f"serving_inputs({name}): CTRBatch.sparse[{f!r}] holds the PAD id {PAD_ID} inside a "
                             "bag; the padded serving layout reserves it for padding")
        bags.append(jagged_to_padded(values, kjt[f].lengths(), width, keep="first", impl="gather"))
    multi_ids = (torch.stack(bags, 1) if bags else torch.zeros(B, 0, 1, dtype=torch.int64, device=device))

    if spec.has_history:
        lengths = kjt[spec.history_keys[0]].lengths().to(torch.int64)
        for key in spec.history_keys[1:]:
            if not torch.equal(kjt[key].lengths().to(torch.int64), lengths):
                raise ValueError(f"serving_inputs({name}): CTRBatch.sparse[{key!r}] must have the same lengths as "
                                 f"{spec.history_keys[0]!r}")
        hist_ids = torch.stack([jagged_to_padded(kjt[k].values().to(torch.int64), lengths, T, keep="recent",
                                                 impl="gather") for k in spec.history_keys], 1)
        n_events = int(lengths.sum())
        if batch.hist_timestamps.numel() != n_events:
            raise ValueError(f"serving_inputs({name}): CTRBatch.hist_timestamps must have one timestamp per history "
                             f"event ({n_events}), got {batch.hist_timestamps.numel()}")
        hist_ts = jagged_to_padded(batch.hist_timestamps.to(torch.int64), lengths, T, keep="recent", impl="gather")
        hist_lengths = lengths.clamp(max=T)
    else:
        hist_ids = torch.zeros(B, 0, T, dtype=torch.int64, device=device)
        hist_lengths = torch.zeros(B, dtype=torch.int64, device=device)
        hist_ts = torch.zeros(B, T, dtype=torch.int64, device=device)
    return ServingInputs(single_ids, multi_ids, hist_ids, hist_lengths, hist_ts, batch.timestamps.to(torch.int64),
                         batch.dense.float())


def _trace_example(inputs: ServingInputs) -> ServingInputs:
    """The example inputs ``torch.export`` traces: at least 2 rows and a bag width of at least 2 (it
    specialises a dimension of size 0 or 1 to a constant); added rows repeat the batch, added bag columns are
    PAD, neither changes what is traced."""
    if inputs.single_ids.shape[0] < 2:
        inputs = ServingInputs(*(torch.cat([t, t] if t.shape[0] else [t], 0) for t in inputs))
        if inputs.single_ids.shape[0] < 2:
            raise ValueError("export_ranker: the example batch is empty")
    multi = inputs.multi_ids
    if multi.shape[1] and multi.shape[2] < 2:
        pad = multi.new_full((multi.shape[0], multi.shape[1], 2 - multi.shape[2]), PAD_ID)
        inputs = inputs._replace(multi_ids=torch.cat([multi, pad], 2))
    return inputs


def _dynamic_shapes(spec: FeatureSpec) -> dict[str, dict[int, Any]]:
    batch = torch.export.Dim("batch", min=1)
    shapes: dict[str, dict[int, Any]] = {name: {0: batch} for name in INPUT_NAMES}
    if spec.multi_fields:
        shapes["multi_ids"] = {0: batch, 2: torch.export.Dim("bag_len", min=1)}
    return shapes


def export_ranker(model: Ranker | ServingRanker, example_batch: CTRBatch) -> torch.export.ExportedProgram:
    """``torch.export`` the ranker's :class:`ServingRanker` (eval mode) with a dynamic batch dimension.

    One program serves any batch size (and any bag width ``L``); the history width is fixed at ``max_len``.

    Args:
        model: a built-in ranker (copied; left unchanged) or its :class:`ServingRanker`.
        example_batch: a real batch to trace with (its values do not matter; a batch of one is repeated).

    Returns:
        the ``ExportedProgram``: ``program.module()(*serving_inputs(model, batch))`` gives the logits.

    Raises:
        ValueError: the ranker cannot be made a :class:`ServingRanker` (see there), the example batch does not
            fit its layout (:func:`serving_inputs`), or ``torch.export`` fails on its body (message names the
            ranker and carries torch's reason).
    """
    serving = model if isinstance(model, ServingRanker) else ServingRanker(model)
    args = _trace_example(serving_inputs(serving, example_batch))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_ATTRIBUTE_WARNING)
        try:
            return torch.export.export(serving, tuple(args), dynamic_shapes=_dynamic_shapes(serving.spec),
                                       strict=False)
        except ValueError:
            raise
        except Exception as err:  # torch's tracing errors come in many types; name the ranker once
            raise ValueError(f"export_ranker({serving.ranker_name}): torch.export could not trace the ranker's body: "
                             f"{type(err).__name__}: {err}") from err


def _registry_name(model_name: str) -> str | None:
    from hybrid.ctr_models import RANKER_NAMES, ranker_classes

    return next((n for n in RANKER_NAMES if ranker_classes(n)[1].__name__ == model_name), None)


def serving_metadata(serving: ServingRanker, program: torch.export.ExportedProgram | None = None) -> dict[str, Any]:
    """What a serving stack needs to feed the program: input names, order, dtypes, shapes; task names; fields.

    Shapes name the dynamic dimensions (``"batch"``, ``"bag_len"``) and give the fixed ones as numbers.
    """
    spec = serving.spec
    S, M, H, T = len(spec.single_fields), len(spec.multi_fields), len(spec.history_fields), spec.max_len
    bag = "bag_len" if M else 1
    shapes: dict[str, tuple[list[Any], str, str]] = {
        "single_ids": (["batch", S], "int64", "one id per field of single_fields (PAD 0 = missing)"),
        "multi_ids": (["batch", M, bag], "int64", "ids of each multi_fields bag, right-padded with 0; mean over "
                                                  "the non-zero ids"),
        "hist_ids": (["batch", H, T], "int64", "ids of each history_fields sequence: the most recent max_len "
                                               "events, chronological, right-padded with 0"),
        "hist_lengths": (["batch"], "int64", "real events in hist_ids (<= max_len)"),
        "hist_timestamps": (["batch", T], "int64", "event times in seconds, laid out as hist_ids (0 on padding)"),
        "timestamps": (["batch"], "int64", "request time of the candidate, seconds"),
        "dense": (["batch", spec.num_dense], "float32", "dense features"),
    }
    meta: dict[str, Any] = {
        "format": SIDECAR_FORMAT,
        "ranker": serving.ranker_name,
        "ranker_name": _registry_name(serving.ranker_name),
        "ranker_config": dataclasses.asdict(serving.ranker.config),
        "task_names": list(serving.task_names),
        "inputs": [{"name": n, "dtype": shapes[n][1], "shape": shapes[n][0], "description": shapes[n][2]}
                   for n in INPUT_NAMES],
        "output": {"name": "logits", "dtype": "float32", "shape": ["batch", len(serving.task_names)],
                   "columns": list(serving.task_names)},
        "dynamic_dims": {"batch": {"min": 1}, **({"bag_len": {"min": 1}} if M else {})},
        "pad_id": PAD_ID,
        "max_len": T,
        "embedding_dim": spec.embedding_dim,
        "single_fields": list(spec.single_fields),
        "multi_fields": list(spec.multi_fields),
        "history_fields": list(spec.history_fields),
        "num_dense": spec.num_dense,
        "table_sizes": dict(spec.table_sizes),
        "embedding_sets": len(serving.tables),
        "torch_version": torch.__version__,
    }
    if program is not None:
        meta["graph_inputs"] = [s.arg.name for s in program.graph_signature.input_specs
                                if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    return json.loads(json.dumps(meta))       # as it reads back from the sidecar (lists, not tuples)


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def save_exported(model: Ranker | ServingRanker, example_batch: CTRBatch,
                  path: str | Path) -> tuple[torch.export.ExportedProgram, dict[str, Any]]:
    """Export (:func:`export_ranker`) and write ``path`` (``.pt2``, ``torch.export.save``) plus its JSON
    sidecar ``path.with_suffix(".json")`` (:func:`serving_metadata`).

    Returns:
        ``(program, metadata)``, as :func:`load_exported` gives them back.

    Example:
        >>> from hybrid.ctr_models import GPSDRankerConfig, build_ranker
        >>> model = build_ranker("gpsd", GPSDRankerConfig.tiny(), vocab_sizes, batch.task_names).eval()
        >>> program, meta = save_exported(model, batch, out_dir / "gpsd.pt2")
        >>> meta["inputs"][2]["name"], meta["inputs"][2]["shape"], sorted(p.name for p in out_dir.glob("gpsd.*"))
        ('hist_ids', ['batch', 3, 8], ['gpsd.json', 'gpsd.pt2'])
    """
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"save_exported: the program is written as a .pt2 file, got {str(path)!r}")
    serving = model if isinstance(model, ServingRanker) else ServingRanker(model)
    program = export_ranker(serving, example_batch)
    meta = serving_metadata(serving, program)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path)
    _sidecar(path).write_text(json.dumps(meta, indent=2) + "\n")
    return program, meta


def load_exported(path: str | Path) -> tuple[torch.export.ExportedProgram, dict[str, Any]]:
    """Read what :func:`save_exported` wrote: ``(program, metadata)``.

    Call ``program.module()(*inputs)`` with the tensors ``metadata["inputs"]`` lists, in that order. Needs
    PyTorch only (no TorchRec, no fbgemm, no hybrid).

    Example:
        >>> from hybrid.ctr_models import DCNv2Config, build_ranker
        >>> model = build_ranker("dcn_v2", DCNv2Config.tiny(), vocab_sizes, batch.task_names).eval()
        >>> _ = save_exported(model, batch, out_dir / "dcn.pt2")
        >>> program, meta = load_exported(out_dir / "dcn.pt2")
        >>> program.module()(*serving_inputs(model, batch)).shape, meta["task_names"]
        (torch.Size([16, 2]), ['in_history', 'parity'])
    """
    path = Path(path)
    sidecar = _sidecar(path)
    if not path.is_file() or not sidecar.is_file():
        raise ValueError(f"load_exported: expected {str(path)!r} and its sidecar {str(sidecar)!r} "
                         "(written by save_exported)")
    meta = json.loads(sidecar.read_text())
    if meta.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"load_exported: {str(sidecar)!r} has format {meta.get('format')!r}, expected "
                         f"{SIDECAR_FORMAT!r}")
    return torch.export.load(path), meta


__all__ = [
    "INPUT_NAMES", "SIDECAR_FORMAT", "ServingInputs", "ServingRanker", "serving_inputs", "export_ranker",
    "serving_metadata", "save_exported", "load_exported",
]
