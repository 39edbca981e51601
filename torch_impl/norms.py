"""Sequence- and feature-parallel LayerNorm / RMSNorm on torch_xla SPMD (twin of
:mod:`jax_impl.norms`).

``sharding`` says how the activations around the norm are laid out over the tp axis:

    ============  ===================  ===============================  ========================
    sharding      input / output       forward communication            backward communication
    ============  ===================  ===============================  ========================
    "none"        as given (global)    none (plain norm; parameters     none
                                       replicated on the XLA device)
    "sequence"    [..., S, D] sharded  none: every token is whole on    all-reduce of the
                  on S (dim -2)        its device                       scale/bias gradients
    "features"    [..., D] sharded on  all-reduce of the per-token      all-reduces of per-token
                  D (dim -1)           sums (LayerNorm: 2, mean then    sums; scale/bias are
                                       centred 2nd moment; RMS: 1)      sharded like D
    ============  ===================  ===============================  ========================

The "features" norm runs in the stacked view (``[n, ..., D/n]``, per-device sums added over dim
0), a line-by-line twin of the JAX per-device body; the "sequence" norm is the plain global
computation with the input and output annotated as sharded on the sequence (tokens are whole on
every device, so the partitioner needs no forward communication).

Definitions (``torch.nn.LayerNorm``, HF ``LlamaRMSNorm``): LayerNorm ``(x - mean) / sqrt(var +
eps) * scale + bias`` (biased variance, two passes); RMSNorm ``x / sqrt(mean(x^2) + eps) *
scale``. Statistics in float32 (or wider); output ``dtype`` (default: the input's). Parameters
``scale`` / ``bias`` ``[D]``: the Flax names (``nn.LayerNorm`` calls the scale ``weight``).

``from_module(norm, parallel_config, sharding)`` takes an existing ``nn.LayerNorm``,
``nn.RMSNorm`` or an RMSNorm with a ``weight`` and ``variance_epsilon`` / ``eps`` (Hugging Face
style) exactly.

Public API (same order as the JAX twin): ``SHARDINGS``, ``ParallelLayerNorm``, ``ParallelRMSNorm``.
"""

from __future__ import annotations

import typing as tp

import torch
from torch import nn

from ringpar.layer_args import SHARDINGS, check_feature_split, check_norm_args

from . import mesh as _mesh
from . import xla
from .array_utils import from_stacked, to_stacked
from .collectives import reduce_from_axis
from .linear import TensorParallelConfig

__all__ = ["SHARDINGS", "ParallelLayerNorm", "ParallelRMSNorm"]


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _normalize(x: torch.Tensor, kind: str, eps: float, stacked: tuple | None) -> torch.Tensor:
    """Normalized ``x`` over its last dim in float32. ``stacked=(mesh, axis_name)``: x is the
    stacked ``[n, ..., D/n]`` and the per-device sums are added over dim 0 (all-reduce)."""
    x = x.to(_stats_dtype(x.dtype))
    d = x.shape[-1] * (x.shape[0] if stacked else 1)

    def total(v):
        s = v.sum(-1, keepdim=True)
        if not stacked:
            return s
        mesh, ax = stacked
        return reduce_from_axis(s, ax, mesh=mesh)  # replicated [..., 1]: broadcasts over dim 0

    if kind == "layer":
        xc = x - total(x) / d
        return xc * torch.rsqrt(total(xc * xc) / d + eps)
    return x * torch.rsqrt(total(x * x) / d + eps)


def _affine(xhat, scale, bias, out_dtype):
    y = xhat
    if scale is not None:
        y = y * scale.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(out_dtype)


# Deliberate twin of jax_impl.norms._ParallelNorm, kept line-for-line parallel on purpose: same
# constructor steps, attributes and methods (the shared checks are in ringpar.layer_args).
class _ParallelNorm(nn.Module):
    _kind: tp.ClassVar[str] = "layer"

    def __init__(self, num_features: int, *, epsilon: float = 1e-5, use_scale: bool = True,
                 use_bias: bool = True, dtype: torch.dtype | None = None,
                 param_dtype: torch.dtype = torch.float32,
                 parallel_config: TensorParallelConfig | None = None, sharding: str = "none",
                 seed: int | None = None):
        super().__init__()
        del seed  # deterministic init (ones / zeros); kept for the constructor convention
        num_features, epsilon = check_norm_args(num_features, epsilon, sharding)
        if parallel_config is not None and not isinstance(parallel_config, TensorParallelConfig):
            raise ValueError(f"parallel_config={parallel_config!r}: expected a "
                             f"TensorParallelConfig or None")
        self.num_features, self.epsilon = num_features, epsilon
        self.use_scale, self.use_bias = bool(use_scale), bool(use_bias)
        self.dtype, self.param_dtype = dtype, param_dtype
        self.parallel_config = parallel_config
        self.is_parallel = parallel_config is not None and parallel_config.active
        self.sharding = sharding if self.is_parallel else "none"
        if self.sharding == "features":
            check_feature_split(num_features, parallel_config.axis_name, parallel_config.axis_size)
        device = _mesh.xla_device() if self.is_parallel else None
        for name, use, fill in (("scale", self.use_scale, 1.0), ("bias", self.use_bias, 0.0)):
            if use:
                setattr(self, name, nn.Parameter(torch.full((num_features,), fill,
                                                            dtype=param_dtype, device=device)))
            else:
                self.register_parameter(name, None)
        if self.is_parallel:
            self.reshard()
            self.register_load_state_dict_post_hook(_ParallelNorm._reshard_after_load)

    @classmethod
    def from_module(cls, norm: nn.Module, parallel_config: TensorParallelConfig | None = None,
                    sharding: str = "none", **kwargs) -> "_ParallelNorm":
        """A norm holding exactly the parameters of ``norm`` (``weight`` -> ``scale``).

        ``ParallelLayerNorm.from_module`` takes an ``nn.LayerNorm`` over the last dim;
        ``ParallelRMSNorm.from_module`` an ``nn.RMSNorm`` or a module named ``*RMSNorm`` with a
        ``weight`` [D] and ``variance_epsilon`` or ``eps`` (e.g. HF ``LlamaRMSNorm``).

        Raises:
            ValueError: a module of another kind, a norm over more than the last dim.
        """
        weight, bias, eps = _norm_params(cls._kind, norm)
        ref = weight if weight is not None else bias
        if ref is None:
            raise ValueError(f"norm={type(norm).__name__} has neither weight nor bias: nothing to "
                             f"take (use the constructor)")
        out = cls(ref.shape[0], epsilon=eps, use_scale=weight is not None,
                  use_bias=bias is not None, param_dtype=ref.dtype,
                  parallel_config=parallel_config, sharding=sharding, **kwargs)
        with torch.no_grad():
            for name, value in (("scale", weight), ("bias", bias)):
                if value is not None:
                    getattr(out, name).copy_(value.detach().to(getattr(out, name).device))
        out.reshard()
        return out

    def reshard(self) -> None:
        """Annotate ``scale``/``bias``: replicated ("sequence") or sharded like D ("features")."""
        if not self.is_parallel:
            return
        cfg = self.parallel_config
        spec = (cfg.axis_name,) if self.sharding == "features" else (None,)
        for p in (self.scale, self.bias):
            if p is not None:
                _mesh.check_on_device(p, "scale/bias")
                _mesh.mark_sharding(p, cfg.mesh, spec)

    @staticmethod
    def _reshard_after_load(module, incompatible_keys) -> None:
        for p in (module.scale, module.bias):
            if p is not None and not xla.has_sharding(p):
                module.reshard()
                return

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize ``x`` ``[..., D]`` over its last dim (global tensors; module docstring)."""
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.num_features:
            raise ValueError(f"x.shape={tuple(getattr(x, 'shape', ()))}: expected the last dim to "
                             f"be num_features={self.num_features}")
        out_dtype = self.dtype or x.dtype
        if self.sharding == "none":
            return _affine(_normalize(x, self._kind, self.epsilon, None), self.scale, self.bias,
                           out_dtype)
        cfg = self.parallel_config
        mesh, ax, n = cfg.mesh, cfg.axis_name, cfg.axis_size
        _mesh.check_on_device(x, "x")
        if self.sharding == "sequence":
            if x.dim() < 2 or x.shape[-2] % n:
                raise ValueError(f"x.shape={tuple(x.shape)}: expected [..., seq, features] with "
                                 f"seq divisible by the {ax!r} axis size {n} "
                                 f"(sharding='sequence')")
            spec = (None,) * (x.dim() - 2) + (ax, None)
            x = _mesh.mark_sharding(x, mesh, spec)
            y = _affine(_normalize(x, self._kind, self.epsilon, None), self.scale, self.bias,
                        out_dtype)
            return _mesh.mark_sharding(y, mesh, spec)
        # features: stacked view [n, ..., D/n], per-device sums added over dim 0
        xs = to_stacked(x, ax, mesh=mesh)
        lead = (n,) + (1,) * (x.dim() - 1)
        scale = None if self.scale is None else _mesh.mark_stacked(
            self.scale.reshape(n, -1), mesh, ax).reshape(*lead, -1)
        bias = None if self.bias is None else _mesh.mark_stacked(
            self.bias.reshape(n, -1), mesh, ax).reshape(*lead, -1)
        ys = _affine(_normalize(xs, self._kind, self.epsilon, (mesh, ax)), scale, bias, out_dtype)
        return from_stacked(ys, ax, mesh=mesh)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, epsilon={self.epsilon}, use_scale={self.use_scale}, "
                f"use_bias={self.use_bias}, sharding={self.sharding!r}")


def _norm_params(kind: str, norm: nn.Module):
    """(weight, bias, eps) of a torch/HF norm module of ``kind``; ValueError for anything else."""
    name = type(norm).__name__
    if kind == "layer":
        if not isinstance(norm, nn.LayerNorm):
            raise ValueError(f"norm={name}: expected a torch.nn.LayerNorm")
        if len(norm.normalized_shape) != 1:
            raise ValueError(f"norm.normalized_shape={tuple(norm.normalized_shape)}: expected a "
                             f"norm over the last dim only")
        return norm.weight, norm.bias, float(norm.eps)
    rms = getattr(nn, "RMSNorm", None)
    if rms is not None and isinstance(norm, rms):
        if len(norm.normalized_shape) != 1:
            raise ValueError(f"norm.normalized_shape={tuple(norm.normalized_shape)}: expected a "
                             f"norm over the last dim only")
        eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
        return norm.weight, None, float(eps)
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if name.endswith("RMSNorm") and isinstance(weight, torch.Tensor) and weight.dim() == 1 \
            and isinstance(eps, (int, float)):
        return weight, getattr(norm, "bias", None), float(eps)
    raise ValueError(f"norm={name}: expected a torch.nn.RMSNorm or a '*RMSNorm' module with a "
                     f"1-D weight and variance_epsilon/eps")


class ParallelLayerNorm(_ParallelNorm):
    """LayerNorm over the last dim whose input may be sharded on the sequence or the features.

    Args:
        num_features: D.
        epsilon: Added to the variance.
        use_scale, use_bias: Whether to learn ``scale`` [D] (ones) and ``bias`` [D] (zeros).
        dtype: Output dtype (default: the input's); statistics are float32.
        param_dtype: Parameter dtype.
        parallel_config: A ``TensorParallelConfig`` (mesh and ``axis_name``), or None (then the
            parameters stay on the CPU until moved, as ``nn.LayerNorm``).
        sharding: "none", "sequence" or "features" (module docstring table).
        seed: Unused (deterministic init), accepted for the constructor convention.
    """

    _kind = "layer"


class ParallelRMSNorm(_ParallelNorm):
    """RMSNorm ``x / sqrt(mean(x^2) + eps) * scale`` (no bias by default); see ParallelLayerNorm.

    Args: as :class:`ParallelLayerNorm`, with ``use_bias=False`` by default and ``epsilon=1e-6``.
    """

    _kind = "rms"

    def __init__(self, num_features: int, *, epsilon: float = 1e-6, use_scale: bool = True,
                 use_bias: bool = False, dtype: torch.dtype | None = None,
                 param_dtype: torch.dtype = torch.float32,
                 parallel_config: TensorParallelConfig | None = None, sharding: str = "none",
                 seed: int | None = None):
        super().__init__(num_features, epsilon=epsilon, use_scale=use_scale, use_bias=use_bias,
                         dtype=dtype, param_dtype=param_dtype, parallel_config=parallel_config,
                         sharding=sharding, seed=seed)
