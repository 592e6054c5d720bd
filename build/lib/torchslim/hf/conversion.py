"""A checkpoint's tensors under the model's names, one tensor at a time: transformers converts
some names when it loads (fused experts are saved one expert at a time, as
``experts.3.gate_proj.weight``, and loaded as one ``experts.gate_up_proj``), and reverts the
conversion when it saves. :class:`ConvertedReader` assembles a model tensor from its saved
pieces with transformers' own converters, and :meth:`ConvertedReader.saved` splits a (pruned)
model tensor back into the pieces ``save_pretrained`` would write."""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn

from torchslim.hf.shards import ShardReader
from torchslim.persistence import CheckpointError


def _conversions(model: nn.Module, legacy: bool) -> tuple[list[Any], list[Any]]:
    """transformers' renamings and converters for the model (none for a model without)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    conversions = get_model_conversion_mapping(model, add_legacy=legacy) or []
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    return renamings, [c for c in conversions if isinstance(c, WeightConverter)]


class ConvertedReader:
    """The tensors of a checkpoint folder under the names of ``model``'s state dict (the model
    on ``meta`` is enough), each assembled when asked."""

    def __init__(self, reader: ShardReader, model: nn.Module) -> None:
        from transformers.core_model_loading import dot_natural_key, rename_source_key

        self.reader = reader
        self.model = model
        renamings, converters = _conversions(model, legacy=True)
        self.converters = {p: c for c in converters for p in c.source_patterns}
        sources: dict[str, list[tuple[str, Optional[str]]]] = {}
        for key in sorted(reader.weight_map, key=dot_natural_key):
            name, pattern = rename_source_key(key, renamings, converters)
            sources.setdefault(name, []).append((key, pattern))
        doubled = [n for n, saved in sources.items() if len(saved) > 1 and saved[0][1] is None]
        if doubled:
            raise CheckpointError(
                f"several saved tensors are read as {doubled[:3]}: "
                f"{[k for k, _ in sources[doubled[0]]]}"
            )
        #: model name -> the saved (name, converter pattern) it is assembled from
        self.sources = sources

    def converted(self, name: str) -> bool:
        return self.sources[name][0][1] is not None

    def dtype(self, name: str) -> torch.dtype:
        return self.reader.dtype(self.sources[name][0][0])

    def get(self, name: str, rows: slice = slice(None)) -> torch.Tensor:
        """Model tensor ``name`` (its ``rows``), read from the pieces it is saved as."""
        sources = self.sources[name]
        if not self.converted(name):
            return self.reader.get(sources[0][0], rows)
        converter = copy.deepcopy(self.converters[sources[0][1]])
        for key, pattern in sources:
            converter.add_tensor(name, key, pattern, lambda key=key: self.reader.get(key))
        tensors = converter.convert(name, model=self.model, config=self.model.config)
        return tensors[name][rows]

    def saved(self, model: nn.Module, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """The pieces ``save_pretrained`` writes for ``model``'s converted tensor ``name`` (on
        ``meta``: their names and shapes); any other tensor under the model's name."""
        from transformers.core_model_loading import revert_weight_conversion

        if not self.converted(name):
            return {name: tensor}
        return revert_weight_conversion(model, {name: tensor})
