"""Reconstruction: refit the layers that consume removed channels, on calibration inputs.

Removing channels takes their contribution out of every layer that reads them (``down_proj`` for
MLP neurons, ``o_proj`` for heads, the next conv for conv channels). For each such *consumer*
(linear, ``Conv1D``, 1-d and 2-d convolutions, grouped ones per group, read through im2col), the
second moments of its inputs are accumulated in float64 over calibration batches and the kept
input columns are refit so that the layer's outputs match what it computed before (ridge-
regularised least squares), with the removed channels' mean contribution moved into the bias
(bias compensation). The refit weights are written with the removed columns zeroed: the model
then computes what the pruned model will compute, so ``verify`` still checks the structural prune
exactly, and reconstruction is reported as the deliberate weight change it is.

Statistics are recorded for as many consumers per calibration pass as ``max_memory`` allows;
layers of a later pass see the inputs of the layers refit before them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from torch import nn
from torch.nn.modules import module as torch_module

from torchslim.capture.modules import call_forward
from torchslim.graph.dependency import Group
from torchslim.graph.record import model_history
from torchslim.importance import moments
from torchslim.pruning.functions import add_bias
from torchslim.pruning.roles import Role
from torchslim.pruning.tied import TiedParameters


@dataclass
class Reconstruction:
    """How to reconstruct: ``pruner.step(reconstruct=Reconstruction(batches, ...))``.

    ``batches``: calibration inputs, each in the form the pruner's forward takes (a tensor, a
    tuple, a dict of keyword arguments, or whatever ``forward_fn`` accepts). ``weights``: refit
    the kept input columns by least squares; ``bias``: move the removed channels' mean
    contribution into the bias; ``add_bias``: give a linear or conv layer without a bias one
    when compensating (recorded in the pruning plan, so ``tp.load_pruned`` and
    ``tp.hf.from_pretrained`` rebuild it); by default (``None``) only where the model allows
    it: not in a model that saves itself through its config (``save_pretrained``), whose
    config has no field for one layer's new bias (the report counts the layers left without
    compensation). ``ridge``: damping of the least squares, relative to
    the mean variance of the kept inputs. ``max_memory``: bytes of float64 statistics held per
    calibration pass."""

    batches: Iterable[Any]
    weights: bool = True
    bias: bool = True
    add_bias: Optional[bool] = None
    ridge: float = 0.1
    max_memory: int = 2 << 30

    def __post_init__(self) -> None:
        if not (self.weights or self.bias):
            raise ValueError("Reconstruction needs weights=True, bias=True or both")
        if not isinstance(self.ridge, (int, float)) or self.ridge < 0:
            raise ValueError(f"ridge must be a number >= 0, got {self.ridge!r}")
        if not isinstance(self.max_memory, int) or self.max_memory < 1:
            raise ValueError(f"max_memory must be a positive int (bytes), got {self.max_memory!r}")

    def run(
        self,
        model: nn.Module,
        groups: list[Group],
        forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
    ) -> ReconstructionReport:
        """Refit the consumers of what ``groups`` remove (:func:`reconstruct`); a pruner calls
        this before it prunes them."""
        return reconstruct(model, groups, self, forward_fn)


@dataclass
class LayerResult:
    """One refit layer: its output error on the calibration inputs, relative to the energy of
    its outputs, with the removed columns dropped (``before``) and after the refit (``after``)."""

    name: str
    removed: int
    kept: int
    before: float
    after: float
    added_bias: bool = False
    compensated: bool = False


@dataclass
class ReconstructionReport:
    """What reconstruction changed, and which consumers it left alone (and why)."""

    layers: list[LayerResult] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    tokens: int = 0

    def __str__(self) -> str:
        if not self.layers:
            lines = ["reconstruction: no layer refit"]
        else:
            before = sum(r.before for r in self.layers) / len(self.layers)
            after = sum(r.after for r in self.layers) / len(self.layers)
            added = sum(r.added_bias for r in self.layers)
            without = sum(not r.compensated for r in self.layers)
            lines = [
                f"reconstruction (deliberate weight change): {len(self.layers)} layers refit on "
                f"{self.tokens} calibration positions; mean relative output error "
                f"{before:.4f} -> {after:.4f}"
                + (f"; biases added to {added}" if added else "")
                + (f"; {without} without bias compensation" if without else "")
            ]
        lines += [f"  not refit: {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


class ReconstructionError(ValueError):
    """Calibration batches that do not fit the model, or a system that cannot be solved."""


def consumers(groups: Iterable[Group]) -> dict[nn.Module, tuple[str, set[int]]]:
    """Every layer that reads channels the groups remove: its name and the positions removed
    from its input dim (within one group of a grouped convolution)."""
    found: dict[nn.Module, tuple[str, set[int]]] = {}
    for group in groups:
        for member, positions in group.removed_positions(group.idxs):
            module = member.ref.module
            if member.ref.name != "weight" or group.handler_role(member) != Role.IN:
                continue
            _, removed = found.setdefault(module, (member.ref.module_name, set()))
            removed.update(int(p) for p in positions)
    return found


def reconstruct(
    model: nn.Module,
    groups: list[Group],
    config: Reconstruction,
    forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
) -> ReconstructionReport:
    """Refit every consumer of the channels ``groups`` remove (see the module docstring).

    Nothing is pruned here; the caller prunes the groups afterwards. On any error every layer
    is put back as it was."""
    batches = list(config.batches)
    if not batches:
        raise ReconstructionError("reconstruction needs at least one calibration batch")
    report = ReconstructionReport()
    layers = refit_layers(model, groups, report)
    add_biases = config.add_bias
    if add_biases is None:
        add_biases = not (hasattr(model, "config") and hasattr(model, "save_pretrained"))
    originals = {id(layer.module): dict(layer.module._parameters) for layer in layers}
    try:
        for chunk in chunks(layers, config.max_memory):
            report.tokens = _record(model, chunk, batches, forward_fn)
            for layer in chunk:
                report.layers.append(layer.solve(config, add_biases))
    except BaseException:
        for layer in layers:
            layer.module._parameters.clear()
            layer.module._parameters.update(originals[id(layer.module)])
        raise
    added = [
        {"module": layer.name, "role": Role.BIAS.value} for layer in layers if layer.added_bias
    ]
    if added:
        model_history(model).append(
            {"group": "reconstruction: bias added", "idxs": [], "ops": added}
        )
    return report


def refit_layers(
    model: nn.Module, groups: list[Group], report: ReconstructionReport
) -> list[RefitLayer]:
    """The consumers of what ``groups`` remove that can be refit, in the model's module order;
    the others go into ``report.skipped`` with the reason."""
    tied = {id(tensor) for tensor, _ in TiedParameters(model).groups}
    layers = []
    for module, (name, removed) in consumers(groups).items():
        reason = _unsupported(module, tied)
        if reason is not None:
            report.skipped[name] = reason
        else:
            layers.append(RefitLayer(module, name, sorted(removed)))
    order = {id(m): k for k, m in enumerate(model.modules())}
    layers.sort(key=lambda layer: order.get(id(layer.module), 0))
    return layers


def _unsupported(module: nn.Module, tied: set[int]) -> Optional[str]:
    reason = moments.unsupported(module)
    if reason is None and id(module.weight) in tied:
        return "its weight is tied to another layer's (refitting it would change both)"
    return reason


def chunks(layers: list[RefitLayer], budget: int) -> Iterable[list[RefitLayer]]:
    """``layers`` in runs whose statistics fit ``budget`` bytes (one calibration pass each)."""
    chunk: list[RefitLayer] = []
    used = 0
    for layer in layers:
        size = layer.nbytes()
        if chunk and used + size > budget:
            yield chunk
            chunk, used = [], 0
        chunk.append(layer)
        used += size
    if chunk:
        yield chunk


class _Enough(BaseException):
    """Every layer of a pass has seen the batch: the rest of the forward is not needed (a
    ``BaseException``, so that a model's ``except Exception`` does not swallow it)."""


class _Pass:
    """The layers of one calibration pass, and when a batch may stop: once each has seen it,
    if each ran exactly once on the first batch and the model has no forward hooks (the end of
    a forward they wait for would never come)."""

    def __init__(self, model: nn.Module, layers: list[RefitLayer]) -> None:
        self.layers = layers
        self.may_stop = False
        self.hooked = _has_forward_hooks(model)
        self.start()

    def start(self) -> None:
        self.calls = dict.fromkeys(map(id, self.layers), 0)
        self.unseen = len(self.layers)
        self.stopped = False

    def hook(self, layer: RefitLayer) -> Callable[..., None]:
        def observe(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            if self.stopped:
                raise _Enough  # the model went on after the stop: record nothing more
            layer.observe(module, inputs)
            if not self.calls[id(layer)]:
                self.unseen -= 1
            self.calls[id(layer)] += 1
            if self.may_stop and not self.unseen:
                self.stopped = True
                raise _Enough

        return observe

    def end(self, number: int, completed: bool) -> None:
        if number == 0:
            self.may_stop = not self.hooked and all(n == 1 for n in self.calls.values())
        elif completed and self.stopped:
            self.may_stop = False


def _has_forward_hooks(model: nn.Module) -> bool:
    return bool(torch_module._global_forward_hooks) or any(
        m._forward_hooks or hasattr(m, "_hf_hook") for m in model.modules()
    )


@torch.no_grad()
def _record(
    model: nn.Module,
    layers: list[RefitLayer],
    batches: list[Any],
    forward_fn: Optional[Callable[[nn.Module, Any], Any]],
) -> int:
    """Run the calibration batches once with every layer of ``layers`` accumulating its input
    statistics; returns the number of positions (tokens, pixels) the last layer saw.

    Later batches stop as soon as every layer has seen its input, where that is safe (see
    :class:`_Pass`): a pass for the first layers of a deep model costs only the forward up to
    them."""
    run = _Pass(model, layers)
    handles = [layer.module.register_forward_pre_hook(run.hook(layer)) for layer in layers]
    was_training = model.training
    model.eval()
    try:
        for number, batch in enumerate(batches):
            run.start()
            try:
                call_forward(model, batch, forward_fn)
            except _Enough:
                run.end(number, completed=False)
            except ReconstructionError:
                raise
            except Exception as error:
                raise ReconstructionError(
                    f"calibration batch {number} failed in the model's forward "
                    f"({type(error).__name__}: {error}); batches must be inputs of the form "
                    "the pruner's example_inputs (or forward_fn) take"
                ) from error
            else:
                run.end(number, completed=True)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return require_inputs(layers)


def require_inputs(layers: list[RefitLayer]) -> int:
    """Refuses a layer the calibration batches never reached; the positions the last saw."""
    for layer in layers:
        if layer.count == 0:
            raise ReconstructionError(
                f"{layer.name} received no calibration input: the batches never reach it"
            )
    return layers[-1].count


#: float64 working set of one block of output rows of a refit: the rows are refit apart (a
#: least-squares refit's rows are independent), since a 128k-row LM head held whole in float64
#: with its products needs over 20 GB
ROW_BLOCK_BYTES = 256 * 2**20


class RefitLayer(moments.InputMoments):
    """One consumer: its input moments and the features its removed channels take away."""

    def __init__(self, module: nn.Module, name: str, removed: list[int]) -> None:
        super().__init__(module, name)
        self.added_bias = False
        self.channels = moments.input_channels(module)
        self.removed_channels = removed
        per_channel = moments.kernel_size(module)
        removed_features = np.concatenate(
            [np.arange(c * per_channel, (c + 1) * per_channel) for c in removed]
        )
        mask = np.ones(self.features, bool)
        mask[removed_features] = False
        self.kept = torch.as_tensor(np.nonzero(mask)[0])
        self.gone = torch.as_tensor(removed_features)

    def solve(self, config: Reconstruction, add_bias_allowed: bool) -> LayerResult:
        kept, gone = self.kept, self.gone
        mean = self.mean()
        second = self.gram.div_(self.count)  # in place: the sums are not needed again
        bias_allowed = self.module.bias is not None or (
            add_bias_allowed and isinstance(self.module, (nn.Linear, nn.modules.conv._ConvNd))
        )
        with_bias = config.bias and bias_allowed
        fitted = second - mean.unsqueeze(2) * mean.unsqueeze(1) if with_bias else second
        factor, damping = None, None
        if config.weights and kept.numel():
            factor, damping = self._factor(fitted, config.ridge)
        blocks = _Moments(second[:, gone][:, :, gone], fitted[:, :, kept], fitted[:, :, gone])
        del second, fitted
        rows = moments.weight_row_view(self.module)
        new_rows = torch.empty(rows.shape, dtype=rows.dtype)
        shift = torch.empty(rows.shape[:2], dtype=torch.float64) if with_bias else None
        errors = torch.zeros(3, dtype=torch.float64)  # before, centred energy, after
        offset = torch.zeros((), dtype=torch.float64)  # ||W mean||^2: uncentred energy - centred
        step = max(1, ROW_BLOCK_BYTES // (8 * 4 * self.features))
        for start in range(0, rows.shape[1], step):
            weight = rows[:, start : start + step].double()
            new_weight, block_errors = blocks.refit(weight, kept, gone, factor, damping)
            errors += block_errors
            if with_bias:
                shift[:, start : start + step] = torch.einsum(
                    "goi,gi->go", weight - new_weight, mean
                )
                offset += torch.einsum("goi,gi->go", weight, mean).square().sum()
            new_rows[:, start : start + step] = new_weight
        before, centred, after = errors.tolist()
        energy = max(centred + float(offset), 1e-300)
        self._write(new_rows, None if shift is None else shift.reshape(-1))
        del self.gram, self.total  # spent: a deep model's refit holds one run's statistics
        removed = len(self.removed_channels)
        return LayerResult(
            self.name,
            removed,
            self.channels - removed,
            before / energy,
            max(after, 0.0) / energy,
            self.added_bias,
            with_bias,
        )

    def _factor(self, fitted: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The Cholesky factor of the kept features' damped moments and the damping
        ``lambda`` of each group: the refit minimises ``E||W x - W'_K x_K||^2 + lambda
        ||W'_K - W_K||^2``, pulled towards the unrefit weights (a large ``ridge`` means plain
        pruning)."""
        kept = self.kept
        system = fitted[:, kept][:, :, kept]  # square matrices of the kept features' size:
        damping = ridge * system.diagonal(dim1=1, dim2=2).mean(1).clamp(min=0)
        system.diagonal(dim1=1, dim2=2).add_(damping.view(-1, 1))  # no more of them than needed
        factor, info = torch.linalg.cholesky_ex(system)
        del system
        if int(info.max()) != 0:
            raise ReconstructionError(
                f"{self.name}: the least-squares system is singular (inputs of the kept "
                "channels are constant or linearly dependent on the calibration batches); "
                "use more calibration data or a larger ridge"
            )
        return factor, damping

    def _write(self, weight: torch.Tensor, shift: Optional[torch.Tensor]) -> None:
        module = self.module
        moments.write_weight_rows(module, weight)
        if shift is None:
            return
        if module.bias is None:
            add_bias(module)
            self.added_bias = True
        bias = module.bias
        module.bias = nn.Parameter(
            (bias.detach().double() + shift.to(bias.device)).to(bias.dtype),
            requires_grad=bias.requires_grad,
        )


@dataclass
class _Moments:
    """The input moments a block of output rows is refit with: the uncentred ones among the
    removed features, the fitted ones (centred when the bias absorbs the mean) of every
    feature with the kept and with the removed ones."""

    second_gone: torch.Tensor
    fitted_kept: torch.Tensor
    fitted_gone: torch.Tensor

    def refit(
        self,
        weight: torch.Tensor,
        kept: torch.Tensor,
        gone: torch.Tensor,
        factor: Optional[torch.Tensor],
        damping: Optional[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The new rows of ``weight`` (``[groups, rows, features]``, float64): the removed
        columns zero, the kept ones refit when a ``factor`` is given; and the block's error
        before, centred energy and error after. ``E||W x||^2 = <W, W S>`` comes from
        the products with the kept and the removed columns (the first is the refit's
        right-hand side), two products of the rows with the moments, not four."""
        dropped = weight[:, :, gone]  # dropping them is the only change before the refit
        before = _energy(dropped, self.second_gone)
        to_kept = torch.einsum("goi,gik->gok", weight, self.fitted_kept)
        to_gone = torch.einsum("goi,gik->gok", weight, self.fitted_gone)
        kept_weight = weight[:, :, kept]
        centred = _inner(kept_weight, to_kept) + _inner(dropped, to_gone)
        new_weight = torch.zeros_like(weight)
        if factor is None:
            new_weight[:, :, kept] = kept_weight
            after = _energy(dropped, self.fitted_gone[:, gone])
        else:
            rhs = to_kept + damping.view(-1, 1, 1) * kept_weight
            refit = torch.cholesky_solve(rhs.transpose(1, 2), factor).transpose(1, 2)
            new_weight[:, :, kept] = refit
            after = _refit_error(centred, refit, to_kept, kept_weight, damping)
        return new_weight, torch.stack([before, centred, after])


def _inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.einsum("goi,goi->", a, b)


def _refit_error(
    energy: torch.Tensor,
    refit: torch.Tensor,
    to_kept: torch.Tensor,
    kept: torch.Tensor,
    damping: torch.Tensor,
) -> torch.Tensor:
    """``E||W x - W'_K x_K||^2`` in closed form: with ``S`` the moments, ``R = W S_K`` and
    ``W'_K (S_KK + lambda) = R + lambda W_K``, it is ``E||W x||^2 - <W'_K, R> + lambda
    <W'_K, W_K - W'_K>`` (no product with the moments, each of which costs as much as the
    refit at an 8B model's width)."""
    correction = torch.einsum("goi,goi->g", refit, kept - refit) @ damping
    return energy - _inner(refit, to_kept) + correction


def _energy(weight: torch.Tensor, moments: torch.Tensor) -> torch.Tensor:
    """``E||W x||^2`` from the input moments (centred when the bias absorbs the mean): how
    much output the weights ``[groups, outputs, features]`` make, or, for a change of
    weights, how far it moves the outputs."""
    return torch.einsum("goi,gij,goj->", weight, moments, weight)
