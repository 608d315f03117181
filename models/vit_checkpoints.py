"""ViT teachers from checkpoints where users keep them.

Three layouts are read, each into a model built by `models.vit.build_vit`:

- timm state dicts (`.pth`/`.pt`/`.bin` torch pickle or `.safetensors`), e.g.
  `vit_base_patch16_224.augreg_in21k_ft_in1k` or DeiT `deit_base_patch16_224`;
- Hugging Face `transformers` folders (`config.json` + `model.safetensors` or
  `pytorch_model.bin`, `ViTForImageClassification` or `ViTModel` key names);
- Google `.npz` files (`models.vit.load_google_npz`).

The architecture is read from the checkpoint itself: width, depth, MLP width and patch size from
tensor shapes, the stored image size from the position embedding's length, `norm_pre` (timm's
`pre_norm=True`) and a bias-free patch projection from the keys present, the class count from
the head. Heads and LayerNorm epsilon come from `config.json` for Hugging Face and from the
kernel shapes for Google. A timm state dict stores neither: heads follow timm's table of widths
(`TIMM_HEADS`) and epsilon is timm's `VisionTransformer` default, 1e-6; the activation is taken
to be exact GELU (timm's OpenAI-CLIP `quickgelu` configs are not told apart by their weights).

Supported: class-token ViTs with a linear head, with or without a position embedding for the
class token (timm's `no_embed_class`). Refused in one line naming the file: global-pool heads
(`fc_norm`, no class token), register or distillation tokens, layer scale, qk-norm, attention-pool
heads, and any other key set that does not match (a few missing/unexpected keys are named).

A teacher is described by a small spec (`teacher_spec`), saved in the teacher stage's
`model.json` so later stages rebuild the same graph (`build_model`): a registered ViT name and
overrides of its `build_vit` arguments, the position grid always, and for an architecture other
than ViT-Ti/S/B whatever differs from the registered ViT of the nearest width.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import numpy as np

import models
from models import timm_convert
from models.compat import keras
from models.vit import LN_EPS, PATCH, VIT_CONFIGS, load_google_npz, resample_pos_embedding

# Heads per width in timm's ViT configs (head width 64, ViT-H/g/G 16 heads); a timm state dict
# does not store the head count.
TIMM_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}
# Keys (prefixes) of timm ViT variants this project does not build, and what they mean.
_UNSUPPORTED = {
    "fc_norm.": "a global-average-pool head (fc_norm)",
    "reg_token": "register tokens",
    "dist_token": "a distillation token (DeiT distilled)",
    "head_dist.": "a distillation head (DeiT distilled)",
    "attn_pool.": "an attention-pool head",
}
_UNSUPPORTED_IN_BLOCKS = {"ls1.": "layer scale (DeiT III)", "attn.q_norm.": "qk-norm",
                          "attn.norm.": "attention norm", "mlp.norm.": "MLP norm"}
_REGISTERED_DEFAULTS = dict(patch=PATCH, ln_eps=LN_EPS, pre_norm=False, patch_bias=True)
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_HF_BLOCK = {"layernorm_before": "norm1", "attention.output.dense": "attn.proj",
             "layernorm_after": "norm2", "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
_HF_TOP = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
           "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
           "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}


def _registered_archs():
    """(name, build_vit arguments) of the registered ViTs."""
    return [(f"vit_{size}_patch16", {**cfg, **_REGISTERED_DEFAULTS})
            for size, cfg in VIT_CONFIGS.items()]


def _differences(arch: dict, base: dict) -> dict:
    """The entries of `arch` (pos_grid aside) that differ from `base`."""
    return {k: v for k, v in arch.items() if k != "pos_grid" and base.get(k) != v}


@dataclasses.dataclass(frozen=True)
class ViTCheckpoint:
    """What a checkpoint says about its model."""

    source: str  # the file as error messages name it (quoted path)
    layout: str  # "timm", "Hugging Face" or "google"
    arch: dict  # build_vit keyword arguments; pos_grid is the grid the checkpoint stores
    num_classes: int | None  # rows of its head; None when it has none

    def describe(self) -> str:
        a = self.arch
        return (f"width {a['dim']}, depth {a['depth']}, {a['heads']} heads, MLP {a['mlp_dim']}, "
                f"patch {a['patch']}, {a['pos_grid'] * a['patch']} px")


# ------------------------------------------------------------------------------------ reading
def read_checkpoint(path: str) -> tuple[ViTCheckpoint, dict[str, np.ndarray]]:
    """The checkpoint's description and its tensors (timm names; Google's own for `.npz`).

    Raises ValueError with one line naming the file for anything that is not a readable ViT
    checkpoint of a supported layout.
    """
    path = str(path)
    if os.path.isdir(path):
        return _read_huggingface(path)
    if not os.path.isfile(path):
        raise ValueError(f"no such file or folder {path!r}")
    if path.endswith(".npz"):
        try:
            state = dict(np.load(path))
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
            raise ValueError(f"cannot read {path!r} as a Google ViT .npz: "
                             f"{' '.join(str(e).split())[:200]}") from e
        return _google_checkpoint(state, path), state
    state = timm_convert.read_state_dict(path)
    return _timm_checkpoint(state, repr(path)), state


def inspect_checkpoint(path: str) -> ViTCheckpoint:
    """Read and check a checkpoint without building a model (for flag validation)."""
    return read_checkpoint(path)[0]


def _check_keys(source, layout, actual, expected, optional=()) -> None:
    problems = timm_convert.key_problems(actual, expected, ignored=optional)
    if problems:
        raise ValueError(f"{source}: keys do not match a {layout} ViT: {'; '.join(problems)}")


def _grid_of(n_tokens: int, source: str) -> tuple[int, bool]:
    """(grid, whether the class token has a position) from the position embedding's length."""
    for n, with_cls in ((n_tokens - 1, True), (n_tokens, False)):
        g = math.isqrt(max(n, 0))
        if n > 0 and g * g == n:
            return g, with_cls
    raise ValueError(f"{source}: position embedding of {n_tokens} tokens is not a square grid "
                     "(plus a class token)")


def _timm_expected_keys(arch: dict, head: bool) -> list[str]:
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "norm.bias"]
    keys += ["patch_embed.proj.bias"] if arch["patch_bias"] else []
    keys += ["norm_pre.weight", "norm_pre.bias"] if arch["pre_norm"] else []
    keys += ["head.weight", "head.bias"] if head else []
    for i in range(arch["depth"]):
        keys += [f"blocks.{i}.{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2",
                                                 "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")]
    return keys


def _timm_checkpoint(state, source, *, heads=None, ln_eps=LN_EPS, layout="timm") -> ViTCheckpoint:
    """Infer the architecture of a timm-layout state dict (see the module docstring)."""
    if "patch_embed.proj.weight" not in state or "blocks.0.attn.qkv.weight" not in state:
        raise ValueError(f"{source} is not a ViT checkpoint: expected timm ViT keys "
                         f"(patch_embed.proj.weight, blocks.0.attn.qkv.weight, ...), found "
                         f"{timm_convert.few(state, 3)}")
    for prefix, what in _UNSUPPORTED.items():
        if any(k.startswith(prefix) for k in state):
            raise ValueError(f"{source} is a ViT with {what}, which is not supported (only "
                             "class-token ViTs with a linear head)")
    for part, what in _UNSUPPORTED_IN_BLOCKS.items():
        if any(re.match(rf"blocks\.\d+\.{re.escape(part)}", k) for k in state):
            raise ValueError(f"{source} is a ViT with {what}, which is not supported")
    if "cls_token" not in state or "pos_embed" not in state:
        raise ValueError(f"{source} is a ViT without a class token or position embedding "
                         "(a global-pool ViT), which is not supported")
    dim, channels, patch, patch_w = state["patch_embed.proj.weight"].shape
    if channels != 3 or patch != patch_w:
        raise ValueError(f"{source}: patch embedding {state['patch_embed.proj.weight'].shape} "
                         "is not a square patch over RGB")
    heads = heads or TIMM_HEADS.get(dim)
    if heads is None:
        raise ValueError(f"{source}: a timm state dict does not store the number of heads and "
                         f"width {dim} is none of timm's ({', '.join(map(str, TIMM_HEADS))})")
    grid, _ = _grid_of(state["pos_embed"].shape[1], source)
    depth = sum(1 for k in state if re.fullmatch(r"blocks\.\d+\.attn\.qkv\.weight", k))
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    arch = dict(dim=int(dim), depth=depth, heads=int(heads),
                mlp_dim=int(fc1.shape[0]) if fc1 is not None else 4 * int(dim),
                patch=int(patch), pos_grid=grid, ln_eps=float(ln_eps),
                pre_norm="norm_pre.weight" in state, patch_bias="patch_embed.proj.bias" in state)
    head = "head.weight" in state
    _check_keys(source, layout, state, _timm_expected_keys(arch, head))
    return ViTCheckpoint(source, layout, arch, int(state["head.weight"].shape[0]) if head else None)


def _read_huggingface(path: str) -> tuple[ViTCheckpoint, dict[str, np.ndarray]]:
    """A `transformers` ViT folder, its tensors renamed to timm's layout (q, k, v fused)."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{path!r} is a folder without config.json: expected a teacher stage "
                         "folder (model.json + weights.h5) or a Hugging Face ViT folder "
                         "(config.json + model.safetensors)")
    try:
        with open(config_path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {config_path!r} as JSON: {e}") from e
    if not isinstance(cfg, dict) or cfg.get("model_type") != "vit":
        kind = cfg.get("model_type") if isinstance(cfg, dict) else None
        raise ValueError(f"{config_path!r} has model_type {kind!r}; expected 'vit' "
                         "(ViTForImageClassification)")
    if cfg.get("hidden_act", "gelu") != "gelu" or cfg.get("num_channels", 3) != 3:
        raise ValueError(f"{config_path!r}: only hidden_act 'gelu' over 3 channels is "
                         f"supported, got {cfg.get('hidden_act')!r}, {cfg.get('num_channels')}")
    weights = next((os.path.join(path, w) for w in _HF_WEIGHTS
                    if os.path.isfile(os.path.join(path, w))), None)
    if weights is None:
        raise ValueError(f"{path!r} has config.json but no {' or '.join(_HF_WEIGHTS)}")
    hf = timm_convert.read_state_dict(weights)
    prefix = "vit." if any(k.startswith("vit.") for k in hf) else ""
    depth = int(cfg.get("num_hidden_layers", 12))
    expected = [prefix + k for k in _HF_TOP]
    expected += [f"{prefix}encoder.layer.{i}.{m}.{p}" for i in range(depth)
                 for m in (*_HF_BLOCK, *(f"attention.attention.{n}" for n in ("query", "key",
                                                                            "value")))
                 for p in ("weight", "bias")]
    optional = ["classifier.weight", "classifier.bias", f"{prefix}pooler.dense.weight",
                f"{prefix}pooler.dense.bias"]
    _check_keys(repr(weights), "Hugging Face", hf, expected, optional)
    state = {timm: hf[prefix + key] for key, timm in _HF_TOP.items()}
    for i in range(depth):
        b = f"{prefix}encoder.layer.{i}."
        for key, timm in _HF_BLOCK.items():
            for p in ("weight", "bias"):
                state[f"blocks.{i}.{timm}.{p}"] = hf[f"{b}{key}.{p}"]
        for p in ("weight", "bias"):
            state[f"blocks.{i}.attn.qkv.{p}"] = np.concatenate(
                [hf[f"{b}attention.attention.{n}.{p}"] for n in ("query", "key", "value")])
    if "classifier.weight" in hf:
        state["head.weight"], state["head.bias"] = hf["classifier.weight"], hf["classifier.bias"]
    ckpt = _timm_checkpoint(state, repr(path), heads=int(cfg.get("num_attention_heads", 12)),
                            ln_eps=float(cfg.get("layer_norm_eps", 1e-12)), layout="Hugging Face")
    return ckpt, state


def _google_checkpoint(w: dict[str, np.ndarray], path: str) -> ViTCheckpoint:
    """Infer the architecture of a Google `.npz` (both layouts `load_google_npz` reads)."""
    if "embedding/kernel" not in w:
        raise ValueError(f"{path!r} is not a Google ViT checkpoint (no 'embedding/kernel' key)")
    if any(k.startswith("pre_logits/") for k in w):
        raise ValueError(f"{path!r} has a pre_logits layer (an i21k-only checkpoint); use a "
                         "checkpoint without representation_size")
    big_vision = "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel" in w
    mha, mlp = ("MultiHeadDotProductAttention_0", "MlpBlock_0") if big_vision \
        else ("MultiHeadDotProductAttention_1", "MlpBlock_3")
    b = "Transformer/encoderblock_0/"
    for key in (f"{b}{mha}/query/kernel", f"{b}{mlp}/Dense_0/kernel",
                "Transformer/posembed_input/pos_embedding"):
        if key not in w:
            raise ValueError(f"{path!r} lacks key {key!r} of a Google ViT checkpoint")
    patch, _, _, dim = w["embedding/kernel"].shape
    grid, with_cls = _grid_of(w["Transformer/posembed_input/pos_embedding"].shape[1],
                              repr(path))
    if not with_cls:
        raise ValueError(f"{path!r}: the position embedding has no class-token position")
    depth = sum(1 for k in w
                if re.fullmatch(r"Transformer/encoderblock_\d+/LayerNorm_0/scale", k))
    arch = dict(dim=int(dim), depth=depth, heads=int(w[f"{b}{mha}/query/kernel"].shape[1]),
                mlp_dim=int(w[f"{b}{mlp}/Dense_0/kernel"].shape[1]), patch=int(patch),
                pos_grid=grid, ln_eps=LN_EPS, pre_norm=False, patch_bias=True)
    head = w.get("head/kernel")
    return ViTCheckpoint(repr(path), "google", arch,
                         int(head.shape[-1]) if head is not None else None)


# ----------------------------------------------------------------------------- building/loading
def teacher_spec(path: str, *, input_size: int) -> dict:
    """The model.json fields of a teacher from `path` trained at `input_size` (cheap: no model).

    The position embedding is stored at `input_size`'s grid, so the teacher runs at its training
    size without resampling (the checkpoint's embedding is resampled once, when loaded).
    """
    ckpt = inspect_checkpoint(path)
    patch = ckpt.arch["patch"]
    if input_size % patch:
        raise ValueError(f"teacher input size {input_size} (--config.teacher.input_size) is not "
                         f"a multiple of the patch size {patch} of {path!r}")
    arch = {**ckpt.arch, "pos_grid": input_size // patch}
    # the registered ViT of the nearest width; what differs from it goes into the overrides
    name, base = min(_registered_archs(), key=lambda nb: abs(nb[1]["dim"] - arch["dim"]))
    return {"name": name, "overrides": {**_differences(arch, base),
                                        "pos_grid": arch["pos_grid"]}}


def build_model(spec: dict, *, num_classes: int) -> keras.Model:
    """Rebuild a teacher from its model.json fields (older files: a name and no overrides)."""
    return models.create_model(spec["name"], num_classes=num_classes,
                               **spec.get("overrides", {}))


def load_checkpoint(model: keras.Model, path: str) -> dict:
    """Load the ViT checkpoint at `path` into `model` (a `build_vit` graph of its architecture).

    The position embedding is resampled to the model's grid; the head is loaded only when its
    class count equals the model's (else the model's fresh head stays, to be fine-tuned).
    Returns {"head_loaded": bool}.
    """
    ckpt, state = read_checkpoint(path)
    _check_fits(model, ckpt)
    if ckpt.layout == "google":
        return {"head_loaded": load_google_npz(model, path)["head_loaded"]}
    return _load_timm_layout(model, state, ckpt)


def num_classes_of(state_dict: dict[str, np.ndarray]) -> int:
    """`models.timm_convert` entry point: the head's class count after checking the layout
    (1000, timm's default, for a headless state dict: the head is then left fresh)."""
    return _timm_checkpoint(state_dict, "the timm state dict").num_classes or 1000


def convert_timm_state_dict(model: keras.Model, state_dict: dict[str, np.ndarray]) -> None:
    """`models.timm_convert` entry point: a timm ViT state dict into a registered ViT."""
    ckpt = _timm_checkpoint(state_dict, "the timm state dict")
    _check_fits(model, ckpt)
    _load_timm_layout(model, state_dict, ckpt)


def _check_fits(model: keras.Model, ckpt: ViTCheckpoint) -> None:
    layer, a = model.get_layer, ckpt.arch
    names = {l.name for l in model.layers}
    have = dict(dim=layer("patch_embed").filters, patch=layer("patch_embed").kernel_size[0],
                depth=sum(1 for n in names if n.endswith("_ln1")),
                mlp_dim=layer("block0_mlp_fc1").units, pre_norm="norm_pre" in names,
                patch_bias=layer("patch_embed").use_bias)
    differ = [f"{k} {a[k]} (model: {v})" for k, v in have.items() if a[k] != v]
    if differ:
        raise ValueError(f"{ckpt.source} ({ckpt.describe()}) does not fit {model.name}: "
                         f"{', '.join(differ)}")


def _load_timm_layout(model: keras.Model, sd: dict[str, np.ndarray], ckpt: ViTCheckpoint) -> dict:
    layer, dim = model.get_layer, ckpt.arch["dim"]
    kernel = sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0)  # [D, C, p, p] -> [p, p, C, D]
    layer("patch_embed").set_weights([kernel] + ([sd["patch_embed.proj.bias"]]
                                                 if ckpt.arch["patch_bias"] else []))
    pos = sd["pos_embed"]
    if not _grid_of(pos.shape[1], ckpt.source)[1]:  # timm no_embed_class: no class position
        pos = np.concatenate([np.zeros((1, 1, dim), pos.dtype), pos], axis=1)
    pe = layer("pos_embed")
    pe.set_weights([sd["cls_token"], resample_pos_embedding(pos, pe.grid)])

    def dense(name, key):
        layer(name).set_weights([sd[key + ".weight"].T, sd[key + ".bias"]])

    def norm(name, key):
        layer(name).set_weights([sd[key + ".weight"], sd[key + ".bias"]])

    if ckpt.arch["pre_norm"]:
        norm("norm_pre", "norm_pre")
    for i in range(ckpt.arch["depth"]):
        p, b = f"block{i}", f"blocks.{i}."
        norm(f"{p}_ln1", b + "norm1")
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]  # [3D, D], [3D]
        for j, part in enumerate("qkv"):
            layer(f"{p}_attn_{part}").set_weights([qkv_w[j * dim:(j + 1) * dim].T,
                                                   qkv_b[j * dim:(j + 1) * dim]])
        dense(f"{p}_attn_proj", b + "attn.proj")
        norm(f"{p}_ln2", b + "norm2")
        dense(f"{p}_mlp_fc1", b + "mlp.fc1")
        dense(f"{p}_mlp_fc2", b + "mlp.fc2")
    norm("norm", "norm")
    head_loaded = ckpt.num_classes == layer("head").units
    if head_loaded:
        dense("head", "head")
    return {"head_loaded": head_loaded}
