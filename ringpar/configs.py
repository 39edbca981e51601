"""Framework-neutral configuration classes (twin of xlstm-jax ``models.configs``).

This module imports neither JAX nor PyTorch: ``jax_impl.configs`` and ``torch_impl.configs``
re-export it, so both backends read the same :class:`ParallelConfig`. It also holds the mesh-shape arithmetic shared by
``jax_impl.mesh`` and ``torch_impl.mesh``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ConfigDict",
    "ParallelConfig",
    "ModelConfig",
    "SubModelConfig",
    "mesh_axis_names",
    "mesh_axis_sizes",
]

_FSDP_DTYPES = ("float32", "bfloat16", "float16")


def _class_path(obj: Any) -> str:
    """Importable dotted path of a class or function, e.g. ``'pkg.mod.Name'``."""
    return f"{obj.__module__}.{obj.__qualname__}"


def _import_path(path: str) -> Any:
    """Import ``'pkg.mod.Name'`` (also accepts ``"<class 'pkg.mod.Name'>"``)."""
    m = re.fullmatch(r"<class '([\w.]+)'>", path.strip())
    if m:
        path = m.group(1)
    module_path, _, name = path.rpartition(".")
    if not module_path:
        raise ValueError(f"class path {path!r} is not of the form 'module.Name'")
    obj = importlib.import_module(module_path)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _to_plain(value: Any) -> Any:
    """Convert a config value into JSON-friendly data (the inverse of ``ConfigDict.from_dict``)."""
    if isinstance(value, ConfigDict) or (hasattr(value, "to_dict") and not isinstance(value, type)):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, type) or inspect.isfunction(value):
        return _class_path(value)
    return str(value)


@dataclass(kw_only=True)
class ConfigDict:
    """Base class of the dataclass configs: dict-like ``get``, ``to_dict`` and ``from_dict``."""

    def get(self, key: str, default: Any = None) -> Any:
        """Return attribute ``key`` or ``default`` if the config has no such attribute."""
        return getattr(self, key, default)

    def to_dict(self) -> dict[str, Any]:
        """Convert the config to nested plain Python data (classes become dotted paths)."""
        return {f.name: _to_plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @staticmethod
    def from_dict(
        config_class: Any,
        data: Any,
        strict_classname_parsing: bool = False,
        ignore_extensive_attributes: bool = True,
        none_to_zero_for_ints: bool = False,
    ) -> Any:
        """Parse ``data`` back into ``config_class`` (nested dataclasses, lists, tuples, classes).

        Args:
            config_class: Typically a dataclass; any other type ``T`` is built as ``T(**data)`` for
                a dict and ``T(data)`` otherwise.
            data: Typically the output of :meth:`to_dict`.
            strict_classname_parsing: If True, a string that should name a class/callable must
                import, else ValueError. If False, an unimportable name is kept as the string.
            ignore_extensive_attributes: If True, keys that are not fields of the dataclass are
                dropped; if False they raise ValueError.
            none_to_zero_for_ints: If True, ``None`` for an ``int`` field becomes ``0``.

        Returns:
            An instance of ``config_class``.
        """
        return _parse(config_class, data, strict_classname_parsing, ignore_extensive_attributes,
                      none_to_zero_for_ints)


def _parse(tp: Any, data: Any, strict: bool, ignore_extra: bool, none_to_zero: bool) -> Any:
    """Parse plain ``data`` into type ``tp``: one step per kind of type (see ``from_dict``)."""
    opts = _ParseOptions(strict, ignore_extra, none_to_zero)
    return opts.parse(tp, data)


@dataclass(frozen=True)
class _ParseOptions:
    """The ``from_dict`` flags, carried through the recursion of :func:`_parse`."""

    strict: bool
    ignore_extra: bool
    none_to_zero: bool

    def parse(self, tp: Any, data: Any) -> Any:
        if tp is Any or tp is None:
            return data
        if isinstance(tp, str):  # unresolved forward reference: leave as is
            return data
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            return self._union(typing.get_args(tp), data)
        if origin in (list, tuple, typing.Sequence, set) or tp in (list, tuple):
            return self._sequence(tp, origin, data)
        if origin is dict or tp is dict:
            return dict(data)
        if _is_callable_type(tp, origin):
            return self._callable(data)
        if tp is int:
            return self._int(data)
        if tp in (float, str, bool):
            if data is None:
                raise TypeError(f"expected {tp.__name__}, got None")
            return tp(data)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            return self._dataclass(tp, data)
        if isinstance(tp, type):
            if isinstance(data, tp):
                return data
            return tp(**data) if isinstance(data, dict) else tp(data)
        return data

    def _union(self, args: tuple, data: Any) -> Any:
        """The first member of ``Union[args]`` that parses ``data`` (data as is if none does)."""
        if data is None:
            if type(None) in args:
                return None
            if int in args and self.none_to_zero:
                return 0
        for arg in args:
            if arg is type(None):
                continue
            try:
                return self.parse(arg, data)
            except (TypeError, ValueError):
                continue
        return data

    def _sequence(self, tp: Any, origin: Any, data: Any) -> Any:
        """A list (or tuple, for tuple types) parsed element by element."""
        if not isinstance(data, (list, tuple)):
            raise TypeError(f"expected a sequence for {tp}, got {data!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            out = [self.parse(a, d) for a, d in zip(args, data)]
        else:
            elem = args[0] if args else Any
            out = [self.parse(elem, d) for d in data]
        return tuple(out) if (origin is tuple or tp is tuple) else out

    def _callable(self, data: Any) -> Any:
        """A class / callable from its dotted path (kept as the string if it does not import,
        unless ``strict``)."""
        if not isinstance(data, str):
            return data
        try:
            return _import_path(data)
        except (ImportError, AttributeError, ValueError) as exc:
            if self.strict:
                raise ValueError(f"cannot import class {data!r}: {exc}") from exc
            return data

    def _int(self, data: Any) -> int:
        if data is None and self.none_to_zero:
            return 0
        if isinstance(data, bool) or not isinstance(data, int):
            raise TypeError(f"expected int, got {data!r}")
        return data

    def _dataclass(self, tp: type, data: Any) -> Any:
        """An instance of dataclass ``tp`` from a dict; fields with ``init=False`` are set after
        construction."""
        if isinstance(data, tp):
            return data
        if not isinstance(data, dict):
            raise TypeError(f"expected a dict for {tp.__name__}, got {data!r}")
        hints = typing.get_type_hints(tp)
        known = {f.name: f for f in dataclasses.fields(tp)}
        extra = sorted(set(data) - set(known))
        if extra and not self.ignore_extra:
            raise ValueError(f"data has attributes {extra} that {tp.__name__} does not define")
        kwargs = {k: self.parse(hints.get(k, Any), v) for k, v in data.items() if k in known}
        obj = tp(**{k: v for k, v in kwargs.items() if known[k].init})
        for k, v in kwargs.items():
            if not known[k].init:
                setattr(obj, k, v)
        return obj


def _is_callable_type(tp: Any, origin: Any) -> bool:
    """Whether annotation ``tp`` names a class or callable (stored as a dotted path)."""
    return tp is callable or tp is type or origin is type or (
        origin is not None and getattr(origin, "__name__", "") == "Callable"
    ) or tp is typing.Callable


@dataclass(kw_only=True)
class ParallelConfig(ConfigDict):
    """Configuration for parallelism: mesh axis sizes and names, remat and FSDP options."""

    data_axis_size: int = -1
    """Size of the data axis. If -1, it is inferred from the number of devices."""
    fsdp_axis_size: int = 1
    """Size of the FSDP axis. If -1, it is inferred from the number of devices."""
    pipeline_axis_size: int = 1
    """Size of the pipeline axis. If -1, it is inferred from the number of devices."""
    model_axis_size: int = 1
    """Size of the model (tensor-parallel) axis. If -1, it is inferred from the number of devices."""
    data_axis_name: str = "dp"
    """Name of the data axis."""
    fsdp_axis_name: str = "fsdp"
    """Name of the FSDP axis."""
    pipeline_axis_name: str = "pp"
    """Name of the pipeline axis."""
    model_axis_name: str = "tp"
    """Name of the model axis."""
    remat: list[str] = field(default_factory=list)
    """Module names on which activation checkpointing / rematerialization is applied."""
    fsdp_modules: list[str] = field(default_factory=list)
    """Module names on which FSDP sharding is applied."""
    fsdp_min_weight_size: int = 2**18
    """Minimum size of a parameter to be sharded with FSDP."""
    fsdp_gather_dtype: str | None = None
    """Dtype to cast parameters to before the FSDP gather; None keeps their precision."""
    fsdp_grad_scatter_dtype: str | None = None
    """Dtype to cast gradients to before scattering; None uses the parameter dtype."""
    tp_async_dense: bool = False
    """Whether dense layers use asynchronous (ring-permute) tensor parallelism."""

    def __post_init__(self) -> None:
        for name in ("fsdp_gather_dtype", "fsdp_grad_scatter_dtype"):
            value = getattr(self, name)
            if value == "None":
                setattr(self, name, None)
            elif value is not None and value not in _FSDP_DTYPES:
                raise ValueError(f"{name}={value!r}: expected None or one of {_FSDP_DTYPES}")
        names = mesh_axis_names(self)
        if len(set(names)) != len(names):
            raise ValueError(f"mesh axis names {names} must be distinct")


@dataclass(kw_only=True)
class ModelConfig(ConfigDict):
    """Base class for model configurations: the model class, its parallel config and its config."""

    model_class: callable
    """Model class (``to_dict`` stores its dotted import path; ``from_dict`` imports it back)."""
    parallel: ParallelConfig
    """Parallelism configuration."""
    model_config: Any = None
    """Model configuration (a ConfigDict dataclass), or None."""

    @staticmethod
    def from_metadata(metadata_content: str) -> "ModelConfig":
        """Create a ModelConfig from the content of a JSON metadata file.

        The JSON holds ``{"model": {"model_class": "pkg.mod.Class", "parallel": {...} or
        "ParallelConfig(k=v, ...)", "model_config": {...}}}``. The model class is imported, and
        ``model_config`` is parsed into the type annotated as ``config`` on the model class (kept
        as a plain dict if the class has no such annotation).

        Returns:
            The parsed ModelConfig (model_class, parallel, model_config).
        """
        try:
            content = json.loads(metadata_content)
        except json.JSONDecodeError as exc:
            raise ValueError(f"metadata_content is not valid JSON: {exc}") from exc
        if not isinstance(content, dict) or not isinstance(content.get("model"), dict):
            raise ValueError("metadata_content: expected a JSON object with a 'model' object")
        model = content["model"]
        for key in ("model_class", "parallel"):
            if key not in model:
                raise ValueError(f"metadata_content: 'model' has no {key!r} entry")
        model_class = _import_path(model["model_class"])
        annotations = inspect.get_annotations(model_class, eval_str=False) if isinstance(
            model_class, type) else {}
        cfg_type = annotations.get("config")
        if isinstance(cfg_type, str):
            cfg_type = typing.get_type_hints(model_class).get("config")
        raw_cfg = model.get("model_config")
        model_cfg = ConfigDict.from_dict(cfg_type, raw_cfg) if (cfg_type and raw_cfg is not None) else raw_cfg
        parallel = model["parallel"]
        if isinstance(parallel, str):
            parallel = _parse_parallel_repr(parallel)
        return ModelConfig(
            model_class=model_class,
            parallel=ConfigDict.from_dict(ParallelConfig, parallel),
            model_config=model_cfg,
        )


def _parse_parallel_repr(text: str) -> dict[str, Any]:
    """Parse ``"ParallelConfig(a=1, b='x', c=[...])"`` (a dataclass repr) into a dict."""
    import ast

    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as exc:
        raise ValueError(f"parallel config string {text!r} is not a ParallelConfig(...) repr") from exc
    if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ParallelConfig"):
        raise ValueError(f"parallel config string {text!r} is not a ParallelConfig(...) repr")
    return {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}


@dataclass
class SubModelConfig:
    """Sub-model configuration for post-init style model configs; provides ``to_dict``."""

    def to_dict(self) -> dict[str, Any]:
        """Convert the config's attributes to nested plain Python data."""
        return {k: _to_plain(v) for k, v in self.__dict__.items()}


def mesh_axis_names(config: ParallelConfig) -> tuple[str, str, str, str]:
    """Mesh axis names in mesh order: (data, fsdp, pipeline, model)."""
    return (config.data_axis_name, config.fsdp_axis_name, config.pipeline_axis_name,
            config.model_axis_name)


def mesh_axis_sizes(config: ParallelConfig, num_devices: int) -> tuple[int, int, int, int]:
    """Resolve the (data, fsdp, pipeline, model) axis sizes for ``num_devices`` devices.

    Exactly one size may be -1 and is inferred. Raises ValueError on a size < 1 (other than a
    single -1), two or more -1 sizes, or a product that does not equal ``num_devices``.
    """
    fields_ = ("data_axis_size", "fsdp_axis_size", "pipeline_axis_size", "model_axis_size")
    sizes = [getattr(config, f) for f in fields_]
    if not isinstance(num_devices, int) or num_devices < 1:
        raise ValueError(f"num_devices={num_devices!r}: expected a positive int")
    for name, size in zip(fields_, sizes):
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ValueError(f"{name}={size!r}: expected a positive int or -1 (inferred)")
    inferred = [f for f, s in zip(fields_, sizes) if s == -1]
    if len(inferred) > 1:
        raise ValueError(f"{inferred} are all -1: at most one axis size may be inferred")
    known = math.prod(s for s in sizes if s != -1)
    if inferred:
        if num_devices % known:
            raise ValueError(
                f"cannot infer {inferred[0]}: {num_devices} devices are not divisible by the "
                f"product {known} of the other axis sizes {dict(zip(fields_, sizes))}")
        sizes = [num_devices // known if s == -1 else s for s in sizes]
    elif known != num_devices:
        raise ValueError(
            f"mesh axis sizes {dict(zip(fields_, sizes))} multiply to {known}, but there are "
            f"{num_devices} devices")
    return tuple(sizes)  # type: ignore[return-value]
