"""Model registry: `create_model`, `list_models`, `get_model_info` (README.md, "Models").

A family module of this package (e.g. `models/mobilevit.py`) declares what the rest of the
project needs to know about the family in one `FAMILY`, and registers its variants with
`@register_model(...)`, timm style:

    FAMILY = Family("mobilevit", structured_pruning=True,
                    timm_names={"mobilevit_xxs": "mobilevit_xxs"},
                    quantize={"Unfold": qat.noop("patch unfolding: moves values")})

    @register_model(params=1_272_024, default_size=256, size_divisor=32, family="mobilevit")
    def mobilevit_xxs(*, num_classes=1000, input_size=None, **overrides) -> keras.Model: ...

`params` is the exact trainable parameter count at 1000 classes of the reference
implementation; a test builds every model and checks it. The modules of the package are found
and imported on first use (`pkgutil`), so a new family module needs no entry anywhere else.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import pkgutil
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Family:
    """What the project knows about one model family, declared as `FAMILY` in its module.

    name: the `family=` its models register with.
    structured_pruning: `compress.structured` can cut its widths (the builders take `widths=`).
    timm_names: registry name -> timm model name, for the variants with timm weights.
    timm_converter: the module holding `convert_timm_state_dict(model, state_dict)` (and
      optionally `num_classes_of(state_dict)`); default: the family module itself.
    timm_build: `create_model` overrides while timm weights load (the model is rebuilt without
      them around the same weights afterwards).
    quantize: layer class name -> `models.qat.Spec`, for the custom layers the module defines.
    """

    name: str
    structured_pruning: bool = False
    timm_names: dict = dataclasses.field(default_factory=dict)
    timm_converter: str | None = None
    timm_build: dict = dataclasses.field(default_factory=dict)
    quantize: dict = dataclasses.field(default_factory=dict)
    module: str = dataclasses.field(default="", compare=False)  # set when the module is found


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """Static facts about a registered model."""

    name: str
    params: int  # exact trainable parameters at 1000 classes
    default_size: int  # default square input size
    size_divisor: int  # input sizes must be multiples of this
    fixed_size: bool  # True: only `default_size` (or sizes the model interpolates to) is exact
    family: str
    role: str  # "student" or "teacher"
    builder: Callable = dataclasses.field(repr=False, compare=False, default=None)

    def input_size(self, *requested: int | None) -> int:
        """The size a pipeline builds, trains at and exports: `default_size` for a fixed-size
        model, else the first of `requested` that is set (flag, then config), else the default."""
        if self.fixed_size:
            return self.default_size
        return next((s for s in requested if s), self.default_size)


_REGISTRY: dict[str, ModelInfo] = {}
_FAMILIES: dict[str, Family] = {}
_loaded = False


def register_model(
    *,
    params: int,
    default_size: int,
    size_divisor: int,
    family: str,
    role: str = "student",
    fixed_size: bool = False,
):
    """Decorator that registers a model builder under its function name."""
    if role not in ("student", "teacher"):
        raise ValueError(f"role must be 'student' or 'teacher', got {role!r}")

    def wrap(fn):
        name = fn.__name__
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelInfo(
            name=name,
            params=params,
            default_size=default_size,
            size_divisor=size_divisor,
            fixed_size=fixed_size,
            family=family,
            role=role,
            builder=fn,
        )
        return fn

    return wrap


def _ensure_loaded() -> None:
    """Import every module of the `models` package once, keeping the `FAMILY` each declares."""
    global _loaded
    if _loaded:
        return
    _loaded = True  # a module that lists models while it is imported sees the ones so far
    package = importlib.import_module(__name__.rpartition(".")[0])
    for found in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        module = importlib.import_module(found.name)
        family = getattr(module, "FAMILY", None)
        if isinstance(family, Family):
            if family.name in _FAMILIES:
                raise ValueError(f"family {family.name!r} is declared twice: by "
                                 f"{_FAMILIES[family.name].module} and {found.name}")
            _FAMILIES[family.name] = dataclasses.replace(family, module=found.name)


def get_family(name: str) -> Family:
    """The `Family` declared under `name`; a family no module declares (a model registered
    from outside the package) gets the defaults: no structured pruning, no timm weights."""
    _ensure_loaded()
    return _FAMILIES.get(name) or Family(name)


def list_families(*, structured_pruning: bool | None = None) -> list[str]:
    """Sorted names of the declared families, optionally only those that do (or do not)
    support structured pruning."""
    _ensure_loaded()
    return sorted(n for n, f in _FAMILIES.items()
                  if structured_pruning is None or f.structured_pruning == structured_pruning)


def timm_names() -> dict[str, str]:
    """Registry name -> timm model name, over every family."""
    _ensure_loaded()
    return {k: v for f in _FAMILIES.values() for k, v in f.timm_names.items()}


def list_models(pattern: str | None = None, *, family: str | None = None) -> list[str]:
    """Sorted registered names, optionally filtered by a glob such as ``"mobilevit_*"`` and by
    family."""
    _ensure_loaded()
    names = sorted(_REGISTRY)
    if pattern is not None:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    if family is not None:
        names = [n for n in names if _REGISTRY[n].family == family]
    return names


def get_model_info(name: str) -> ModelInfo:
    """The `ModelInfo` of a registered model; unknown names raise `ValueError` listing the known."""
    _ensure_loaded()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def check_input_size(name: str, input_size: int | None) -> None:
    """Raise a clear `ValueError` if `input_size` is not a size the model can take."""
    info = get_model_info(name)
    if input_size is None:
        return
    if not isinstance(input_size, int) or isinstance(input_size, bool) or input_size <= 0:
        raise ValueError(f"input_size must be a positive int or None, got {input_size!r}")
    if input_size % info.size_divisor:
        raise ValueError(
            f"{name} takes input sizes that are multiples of {info.size_divisor}; got {input_size}"
        )


def resolve_widths(widths: dict | None, default: dict[str, list[int]], model: str) -> dict:
    """The `widths=` override of a family builder, checked against the reference's widths.

    `widths` is a plain dict of lists (JSON-serialisable, so a stage's `model.json` carries it):
    e.g. MobileViT `{"expand": [...], "heads": [...], "mlp": [...]}`, one entry per block in
    build order (`default_widths` of the family module). A key left out keeps the reference's
    list. An entry is a count (of channels, heads, hidden units), or, where the reference's
    entries are lists, the indices of the units kept (Mobile-Former's Former heads). Raises
    ValueError naming the key on an unknown key, a wrong length, or a width that is not a
    positive int (or not an increasing list of the reference's indices).
    """
    if widths is None:
        return default
    if not isinstance(widths, dict):
        raise ValueError(f"{model}: widths must be a dict of lists, got {type(widths).__name__}")
    unknown = sorted(set(widths) - set(default))
    if unknown:
        raise ValueError(f"{model}: unknown widths key(s) {unknown}; accepted: {sorted(default)}")
    out = dict(default)
    for key, values in widths.items():
        values = list(values)
        if len(values) != len(default[key]):
            raise ValueError(f"{model}: widths[{key!r}] needs {len(default[key])} entries, "
                             f"got {len(values)}")
        if default[key] and isinstance(default[key][0], list):  # indices of the kept units
            for v, ref in zip(values, default[key]):
                if (not isinstance(v, (list, tuple)) or not v or list(v) != sorted(set(v))
                        or any(isinstance(i, bool) or i not in ref for i in v)):
                    raise ValueError(f"{model}: widths[{key!r}] entries must be non-empty "
                                     f"increasing lists of indices from {ref}, got {v}")
            values = [list(v) for v in values]
        elif any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in values):
            raise ValueError(f"{model}: widths[{key!r}] must be positive ints, got {values}")
        out[key] = values
    return out


def create_model(name: str, num_classes: int = 1000, input_size: int | None = None, **overrides):
    """Build a registered model as a tf-keras functional model returning class logits.

    Args:
      name: a name from `list_models()`.
      num_classes: size of the classification head.
      input_size: None for (None, None, 3) inputs where the model takes any multiple of its
        size divisor (its default size otherwise); an int for a fixed SxSx3 input.
      **overrides: architecture options of the family (e.g. `dropout`,
        `with_distillation_head` for EfficientFormer).
    """
    info = get_model_info(name)
    check_input_size(name, input_size)
    if not isinstance(num_classes, int) or num_classes <= 0:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return info.builder(num_classes=num_classes, input_size=input_size, **overrides)
