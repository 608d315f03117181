"""Structured pruning: remove whole units and rebuild a smaller dense model of the same family.

Magnitude pruning (`compress/prune.py`) leaves zeros that XNNPACK multiplies like any weight
(fp32: no faster) or refuses (sparse int8: 8x slower without the delegate). This module instead
removes units, so the result is a thinner dense model, a registered variant rebuilt with
`models.create_model(name, widths=...)`:

  * `expand`: the hidden (expansion) channels of MobileViT's inverted residuals: the 1x1 expand
    conv's outputs, its BN, the depthwise conv and its BN, and the project conv's inputs. The
    block's input and output widths (its interface, residuals included) do not change.
    Mobile-Former's `DnaBlock`s the same way (1x1 conv1, dw conv2, 1x1 conv3), with both
    dynamic ReLUs' slopes (their hyper MLP's `fc2` outputs [a1 | a2], two columns a channel).
  * `heads`: attention heads of every transformer block (MobileViT's, EfficientFormer's Meta3D,
    Mobile-Former's Former), head dim unchanged: q, k, v columns of the head (and its row of
    EfficientFormer's bias table) and the projection's rows. The Former has no key or value
    projection (keys = values = the token stream), so its cut reads the kept heads' channels
    of the stream (`models.mobile_former.SelectHeads`, a weightless slice): its `widths=`
    entry says which heads stay (indices of the reference's), not how many.
  * `mlp`: MLP hidden units of every transformer block (Mobile-Former's Former FFN included) and
    of EfficientFormer's Meta4D conv MLPs.

Not cut, Mobile-Former: the bridges' heads (their keys and values, or queries, are the raw
feature map, so only the token side has per-head weights to cut), `DnaBlock3`'s expansions
(depthwise channel multipliers: a channel cannot go alone), 26M's grouped 1x1 convs (channels
interleaved by the shuffles). So only the Formers (`mlp`, `heads`) are cut in
mobile_former_26m.

Importance (`importance=`), per unit:
  * `taylor` (default): Molchanov et al. 2019 ("Importance Estimation for Neural Network
    Pruning"), the squared first-order Taylor estimate of the loss change when the unit is
    removed, averaged over a few batches of the training objective (the distillation loss with
    the teacher where there is one). Removing unit c multiplies its output by 0, which is the
    same as zeroing its rows of the consumer's kernel W, so the estimate is g_c = sum over those
    rows of dL/dW * W: one gradient of the consumer kernels per batch, no graph change. It is a
    loss change, so units of different layers compare, which a global budget needs.
  * `magnitude`: the unit's activation scale (|gamma| of its BN, or the L2 norm of its input
    weights where there is no BN) times the L2 norm of its output weights, divided by the
    mean of its group: weights alone do not compare across layers (different fan-ins, LN and
    layer scales), so each layer is normalised, and the score is that share of the layer's
    work (times the unit's MACs). Measured (random weights): without the MAC factor the
    per-MAC ranking strips the high-resolution layers to their minimum first.
`select` removes the least score per MAC saved first: for `taylor` the cheapest loss change
per MAC, for `magnitude` the units of least normalised magnitude in any layer.

A latency budget instead of a MAC budget (`keep_for_latency`): the largest `keep` whose cut,
exported as int8 and timed on this host (the caller's `latency_of`), meets the milliseconds, by
bisection between the smallest model and the dense one; the scores are computed once (`plan`).

Selection against a MAC budget (`keep`: fraction of the dense model's MACs): every unit's cost is
the MACs of the layers it feeds and is fed by, divided by the group's units (all linear in the
units); chunks of `granularity` units (8 channels, 1 head: vector widths XNNPACK packs well) are
removed greedily, cheapest loss per MAC first, until the MACs fit. A group keeps at least
`min_width` of its units (default a quarter, rounded up to a chunk; at least one chunk): a
first-order estimate says little about removing most of a layer, and without the floor the
greedy took the high-resolution expansions of a barely trained MobileViT-XXS from 32-48 down to
8 channels at keep 0.7. So a very small `keep` cannot be reached (`min_keep`).

MACs are counted per Keras layer (`layer_macs`, equal to `compress.measure.costs.static_costs`
on these families, a test checks), because a unit's cost needs the per-layer split.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from models.compat import keras, tf

METHODS = ("magnitude", "structured")  # prune.method: compress.prune masks, or this module
IMPORTANCE = ("taylor", "magnitude")
CHANNEL_GRANULARITY = 8
MIN_WIDTH = 0.25  # default fraction of every group's units that stays (module doc)


@dataclasses.dataclass
class Group:
    """One prunable set of units: `widths[key][index]` of the model."""

    key: str  # expand | heads | mlp
    index: int  # position in widths[key]
    units: int
    producers: list  # layers whose outputs (kernel columns, biases, BN vectors) are the units
    consumers: list  # layers whose kernel rows (input channels) are the units
    extra: list  # weightless layers whose MACs scale with the units (q.kT, attn.v)
    granularity: int
    minimum: int
    # producers whose outputs are several copies of the unit axis one after another (a dynamic
    # ReLU's hyper MLP gives [a1 | a2]: unit c is columns c and units + c)
    stacked: list = dataclasses.field(default_factory=list)
    # a group whose `widths=` entry lists the kept units (Mobile-Former's Former heads): the
    # reference's index of each of the model's units; None where the entry is a count
    ids: list | None = None

    @property
    def name(self) -> str:
        return f"{self.key}[{self.index}]"


def check_family(name: str) -> None:
    """ValueError in one line when structured pruning does not support the model's family."""
    from models import registry

    family = registry.get_model_info(name).family
    if not registry.get_family(family).structured_pruning:
        supported = registry.list_families(structured_pruning=True)
        raise ValueError(f"structured pruning supports {', '.join(f + '_*' for f in supported)}; "
                         f"not {name} ({family}_*) yet")


def _numbers(name: str) -> tuple:
    return tuple(int(n) for n in re.findall(r"\d+", name))


def unit_groups(model: keras.Model, min_width: float = MIN_WIDTH) -> list[Group]:
    """The prunable groups of a MobileViT / EfficientFormer / Mobile-Former model, in `widths`
    order; each keeps at least `min_width` of its units (rounded up to whole chunks, at least
    one)."""
    names = {layer.name for layer in model.layers}
    found, stacked = [], []
    for n in sorted(names):
        if m := re.fullmatch(r"(.+)_expand_conv", n):
            p = m[1]
            found.append(("expand", p, [f"{p}_expand_conv", f"{p}_expand_bn", f"{p}_dw_conv",
                                        f"{p}_dw_bn"], [f"{p}_project_conv"], [],
                          CHANNEL_GRANULARITY))
        elif ((m := re.fullmatch(r"(block\d+)_conv1", n)) and f"{m[1]}_hyper2_fc2" in names
              and f"{m[1]}_conv4" not in names
              and type(model.get_layer(n)) is keras.layers.Conv2D):
            p = m[1]  # Mobile-Former DnaBlock, ungrouped (module doc)
            found.append(("expand", p, [f"{p}_conv1", f"{p}_conv1_bn", f"{p}_hyper1_fc2",
                                        f"{p}_conv2", f"{p}_conv2_bn", f"{p}_hyper2_fc2"],
                          [f"{p}_conv3"], [], CHANNEL_GRANULARITY))
            stacked += [f"{p}_hyper1_fc2", f"{p}_hyper2_fc2"]
        elif m := re.fullmatch(r"(.+)_ffn_fc1", n):
            found.append(("mlp", m[1], [n], [f"{m[1]}_ffn_fc2"], [], CHANNEL_GRANULARITY))
        elif m := re.fullmatch(r"(.+_attn|block\d+_former)_q", n):
            p = m[1]  # a Former has no k, v: keys = values = the token stream (module doc)
            producers = [f"{p}_{x}" for x in ("q", "k", "v", "bias") if f"{p}_{x}" in names]
            found.append(("heads", p, producers, [f"{p}_proj"], [f"{p}_qk", f"{p}_av"], 1))
        elif m := re.fullmatch(r"(.+)_mlp_fc1", n):
            p = m[1]
            producers = [n] + [f"{p}_mlp_bn1"] * (f"{p}_mlp_bn1" in names)
            found.append(("mlp", p, producers, [f"{p}_mlp_fc2"], [], CHANNEL_GRANULARITY))
    groups, counts = [], {}
    for key, prefix, producers, consumers, extra, gran in sorted(
            found, key=lambda f: (f[0], _numbers(f[1]))):
        if key == "heads":  # [B, N, heads, head_dim] reshape of q
            units = model.get_layer(f"{prefix}_q_heads_reshape").target_shape[1]
        else:
            units = _channels(model.get_layer(producers[0]))
        minimum = max(1, -(-int(min_width * units) // gran)) * gran
        ids = None
        if re.fullmatch(r"block\d+_former", prefix) and key == "heads":
            select = f"{prefix}_kv_select"  # absent while the Former has all its heads
            ids = model.get_layer(select).kept if select in names else list(range(units))
        groups.append(Group(key, counts.get(key, 0), int(units), producers, consumers, extra,
                            gran, min(minimum, int(units)),
                            [p for p in producers if p in stacked], ids))
        counts[key] = counts.get(key, 0) + 1
    return groups


def _channels(layer) -> int:
    return int(layer.get_weights()[0].shape[-1])


def widths_of(groups: list[Group], kept: dict | None = None) -> dict:
    """The `widths=` dict of lists (JSON-ready) of the groups, with `kept` units where given:
    their count, or for a group with `ids` their reference indices."""
    out = {}
    for g in groups:
        units = list(range(g.units)) if kept is None else [int(i) for i in kept[g.name]]
        out.setdefault(g.key, []).append(
            len(units) if g.ids is None else [int(g.ids[i]) for i in units])
    return out


# --------------------------------------------------------------------------------------- MACs


def layer_macs(model: keras.Model, input_size: int) -> dict[str, int]:
    """MACs of one batch-1 inference per layer (Conv2D, DepthwiseConv2D, Dense, MatMul, and
    Mobile-Former's `ChannelRepeat`, a constant one-hot 1x1 conv: out elements x in channels).

    Shapes are taken from one batch-1 forward pass: MobileViT's tokens carry the pixel
    position inside the patch in the batch axis, which symbolic shapes leave as None (and a
    model with a dynamic input has no static token count).
    """
    from models.layers import MatMul

    kinds = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense, MatMul)
    layers = [l for l in model.layers
              if isinstance(l, kinds) or type(l).__name__ == "ChannelRepeat"]
    probe = keras.Model(model.inputs, [l.output for l in layers] +
                        [l.input[0] for l in layers if isinstance(l, MatMul)])
    outs = probe(np.zeros((1, input_size, input_size, 3), np.float32), training=False)
    lhs = iter(outs[len(layers):])
    macs = {}
    for layer, out in zip(layers, outs):
        n = int(np.prod(out.shape))
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            kh, kw = layer.kernel_size
            macs[layer.name] = n * kh * kw
        elif isinstance(layer, keras.layers.Conv2D):
            kh, kw = layer.kernel_size
            macs[layer.name] = n * kh * kw * int(layer.kernel.shape[2])
        elif isinstance(layer, keras.layers.Dense):
            macs[layer.name] = n * int(layer.kernel.shape[0])
        elif type(layer).__name__ == "ChannelRepeat":
            macs[layer.name] = n * int(layer.input.shape[-1])
        else:
            a = next(lhs).shape
            macs[layer.name] = n * int(a[-2] if layer.transpose_a else a[-1])
    return macs


def unit_costs(groups: list[Group], macs: dict[str, int]) -> dict[str, float]:
    """MACs saved per unit removed, per group (every cost is linear in the group's units)."""
    return {g.name: sum(macs.get(n, 0) for n in g.producers + g.consumers + g.extra) / g.units
            for g in groups}


def min_keep(model: keras.Model, input_size: int, min_width: float = MIN_WIDTH) -> float:
    """The smallest MAC fraction structured pruning reaches (every group at its minimum)."""
    groups = unit_groups(model, min_width)
    macs = layer_macs(model, input_size)
    costs = unit_costs(groups, macs)
    total = sum(macs.values())
    removable = sum(costs[g.name] * _removable(g) for g in groups)
    return (total - removable) / total


def _removable(g: Group) -> int:
    return (g.units - g.minimum) // g.granularity * g.granularity


# ---------------------------------------------------------------------------------- importance


def _out_axis(layer, weight_index: int) -> int:
    """The axis of a producer's weight that indexes its output channels (or heads)."""
    if isinstance(layer, keras.layers.DepthwiseConv2D) and weight_index == 0:
        return 2
    w = layer.weights[weight_index]
    return len(w.shape) - 1 if len(w.shape) > 1 and not _is_bias_table(layer) else 0


def _is_bias_table(layer) -> bool:
    return type(layer).__name__ == "AttentionBias"


def _unit_sum(values: np.ndarray, units: int) -> np.ndarray:
    """Per-channel values [C] -> per-unit sums [units] (a unit is C // units adjacent channels)."""
    return values.reshape(units, -1).sum(axis=1)


def taylor_scores(model: keras.Model, groups: list[Group], batches, loss_fn) -> dict:
    """Mean over batches of (sum over the unit's consumer rows of dL/dW * W)^2 (module doc).

    Args:
      batches: iterable of (images, labels).
      loss_fn: (images, labels) -> scalar loss of `model` (e.g. `Distiller.batch_loss`).
    """
    kernels = [model.get_layer(c).weights[0] for g in groups for c in g.consumers]
    sums = {g.name: np.zeros(g.units) for g in groups}
    n = 0
    for images, labels in batches:
        with tf.GradientTape() as tape:
            loss = loss_fn(images, labels)
        grads = tape.gradient(loss, kernels)
        i = 0
        for g in groups:
            g_unit = np.zeros(g.units)
            for _ in g.consumers:
                gw = (grads[i] * kernels[i]).numpy()
                per_in = gw.reshape(-1, gw.shape[-2], gw.shape[-1]).sum(axis=(0, 2))
                g_unit += _unit_sum(per_in, g.units)
                i += 1
            sums[g.name] += g_unit**2
        n += 1
    if not n:
        raise ValueError("taylor importance needs at least one batch")
    return {k: v / n for k, v in sums.items()}


def magnitude_scores(model: keras.Model, groups: list[Group], costs: dict) -> dict:
    """|BN gamma| (else input-weight norm) x output-weight norm per unit, over its group mean,
    times the unit's MACs (`unit_costs`; module doc)."""
    scores = {}
    for g in groups:
        bns = [p for p in g.producers
               if isinstance(model.get_layer(p), keras.layers.BatchNormalization)]
        if bns:
            scale = np.abs(model.get_layer(bns[-1]).gamma.numpy())
        else:
            kernel = [p for p in g.producers if not _is_bias_table(model.get_layer(p))][-1]
            w = model.get_layer(kernel).weights[0].numpy()
            scale = np.sqrt((w.reshape(-1, w.shape[-1]) ** 2).sum(axis=0))
        out = np.zeros(g.units)
        for c in g.consumers:
            w = model.get_layer(c).weights[0].numpy()
            rows = np.sqrt((np.moveaxis(w, -2, 0).reshape(w.shape[-2], -1) ** 2).sum(axis=1))
            out += _unit_sum(rows * scale, g.units)
        scores[g.name] = out / max(out.mean(), 1e-12) * costs[g.name]
    return scores


# ---------------------------------------------------------------------------------- selection


def select(groups: list[Group], scores: dict, costs: dict, *, keep: float,
           total_macs: float) -> dict:
    """Kept unit indices per group (sorted) so that the MACs are at most `keep * total_macs`.

    Greedy over chunks of `granularity` units, least score per MAC saved first; within a group
    the lowest-scoring units go first (so a group's successive chunks never get cheaper and the
    greedy equals a merge of the groups' sorted chunk lists).
    """
    import heapq

    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    order = {g.name: np.argsort(scores[g.name], kind="stable") for g in groups}
    removed = {g.name: 0 for g in groups}
    heap = []

    def push(g):
        r = removed[g.name]
        if r + g.granularity <= _removable(g):
            chunk = order[g.name][r:r + g.granularity]
            saved = costs[g.name] * g.granularity
            heapq.heappush(heap, (float(np.sum(scores[g.name][chunk])) / max(saved, 1e-12),
                                  g.key, g.index, g))

    for g in groups:
        push(g)
    budget, macs = keep * total_macs, float(total_macs)
    while macs > budget + 1e-6:
        if not heap:
            raise ValueError(f"keep={keep}: out of reach, the smallest model keeps "
                             f"{macs / total_macs:.3f} of the MACs")
        *_, g = heapq.heappop(heap)
        removed[g.name] += g.granularity
        macs -= costs[g.name] * g.granularity
        push(g)
    return {g.name: np.sort(order[g.name][removed[g.name]:]) for g in groups}


# ---------------------------------------------------------------------------------- transfer


def transfer(src: keras.Model, dst: keras.Model, groups: list[Group], kept: dict) -> None:
    """Copy `src`'s weights into the thinner `dst` (same layer names), keeping the `kept` units
    of every group and every other weight as is."""
    slices: dict[str, list] = {}  # layer -> [(weight index, axis, channels)]

    def channels(n, g, stacked=False):
        per = n // g.units
        idx = np.asarray(kept[g.name])
        if stacked:  # `per` copies of the unit axis one after another
            return (np.arange(per)[:, None] * g.units + idx).ravel()
        return (idx[:, None] * per + np.arange(per)).ravel()

    for g in groups:
        for name in g.producers:
            layer = src.get_layer(name)
            for i, w in enumerate(layer.weights):
                axis = _out_axis(layer, i)
                slices.setdefault(name, []).append(
                    (i, axis, channels(w.shape[axis], g, name in g.stacked)))
        for name in g.consumers:
            w = src.get_layer(name).weights[0]
            slices.setdefault(name, []).append((0, len(w.shape) - 2,
                                                channels(w.shape[-2], g)))
    for layer in src.layers:
        if not layer.weights:
            continue
        ws = layer.get_weights()
        for i, axis, ch in slices.get(layer.name, []):
            ws[i] = np.take(ws[i], ch, axis=axis)
        dst.get_layer(layer.name).set_weights(ws)


@dataclasses.dataclass
class Plan:
    """What a cut needs from the dense model, computed once: its groups, their unit scores and
    costs, its MACs (cut it to several budgets from one plan: `widths_for`, `cut`)."""

    groups: list
    scores: dict
    costs: dict
    total_macs: int
    importance: str


def plan(model: keras.Model, *, input_size: int, importance: str = "taylor", batches=None,
         loss_fn=None, min_width: float = MIN_WIDTH) -> Plan:
    """Score the units of `model` (see `prune_structured` for the arguments)."""
    if importance not in IMPORTANCE:
        raise ValueError(f"importance must be one of {IMPORTANCE}, got {importance!r}")
    groups = unit_groups(model, min_width)
    macs = layer_macs(model, input_size)
    costs = unit_costs(groups, macs)
    if importance == "taylor":
        scores = taylor_scores(model, groups, batches, loss_fn)
    else:
        scores = magnitude_scores(model, groups, costs)
    return Plan(groups, scores, costs, int(sum(macs.values())), importance)


def widths_for(p: Plan, keep: float) -> dict:
    """The `widths=` of the cut of plan `p` to `keep` of its MACs (no model built)."""
    return widths_of(p.groups, select(p.groups, p.scores, p.costs, keep=keep,
                                      total_macs=p.total_macs))


def smallest_widths(model: keras.Model, min_width: float = MIN_WIDTH) -> dict:
    """The widths of the smallest model structured pruning reaches (every group at its
    minimum, whatever the scores): what a latency budget is checked against up front."""
    groups = unit_groups(model, min_width)
    return widths_of(groups, {g.name: range(g.units - _removable(g)) for g in groups})


def cut(model: keras.Model, rebuild, p: Plan, *, keep: float, input_size: int):
    """The thinner model with `model`'s kept weights, and a summary (`prune_structured`)."""
    kept = select(p.groups, p.scores, p.costs, keep=keep, total_macs=p.total_macs)
    widths = widths_of(p.groups, kept)
    small = rebuild(widths)
    transfer(model, small, p.groups, kept)
    small_macs = sum(layer_macs(small, input_size).values())
    return small, dict(widths=widths, macs=int(small_macs), dense_macs=int(p.total_macs),
                       kept_fraction=small_macs / p.total_macs, importance=p.importance)


def prune_structured(model: keras.Model, rebuild, *, keep: float, input_size: int,
                     importance: str = "taylor", batches=None, loss_fn=None,
                     min_width: float = MIN_WIDTH):
    """Score, select and cut: the thinner model with `model`'s kept weights, and a summary.

    Args:
      model: the trained model (training or inference heads, as `rebuild` builds).
      rebuild: widths -> a fresh model of the same family and heads with those widths.
      keep: fraction of `model`'s MACs at `input_size` to keep, in (0, 1].
      importance: 'taylor' (needs `batches` and `loss_fn`, see `taylor_scores`) or 'magnitude'.
      min_width: fraction of every group's units that stays (module doc).
    Returns: (small model, dict(widths, macs, dense_macs, kept_fraction, importance)).
    """
    p = plan(model, input_size=input_size, importance=importance, batches=batches,
             loss_fn=loss_fn, min_width=min_width)
    return cut(model, rebuild, p, keep=keep, input_size=input_size)


# ------------------------------------------------------------------------------ latency budget


def keep_for_latency(latency_of, target_ms: float, *, lo: float, hi: float = 1.0,
                     probes: int = 6):
    """The largest MAC fraction in [lo, hi] whose model runs in at most `target_ms`.

    `latency_of(keep) -> ms` measures the cut to `keep` (the stage exports it as int8 and times
    it on this host's XNNPACK). Latency is taken as non-decreasing in the MACs kept, and the
    interval is bisected `probes` times after its two ends; timing noise can break that order,
    so the answer is the largest probed keep that met the budget, never an untimed one.

    Returns: (keep, its ms, [(keep, ms) of every probe in order]).
    Raises ValueError (one line) when even `lo` (the smallest model) misses the budget.
    """
    trials = []

    def probe(k):
        ms = float(latency_of(k))
        trials.append((k, ms))
        return ms

    if probe(hi) <= target_ms:
        return hi, trials[-1][1], trials
    if (ms := probe(lo)) > target_ms:
        raise ValueError(f"target_ms={target_ms:g}: out of reach, the smallest model (keep "
                         f"{lo:.3f} of the MACs) runs in {ms:.2f} ms")
    met, missed = lo, hi
    for _ in range(probes):
        mid = (met + missed) / 2
        if probe(mid) <= target_ms:
            met = mid
        else:
            missed = mid
    best = max(k for k, ms in trials if ms <= target_ms)
    return best, dict(trials)[best], trials
