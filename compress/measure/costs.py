"""Static costs of a Keras model: parameters, MACs and an estimate of memory traffic."""

from __future__ import annotations

import numpy as np


_VIEW_OPS = {"Identity", "Reshape", "Squeeze", "ExpandDims", "Const", "Placeholder", "Shape",
             "StridedSlice", "Pack", "Cast", "NoOp", "ReadVariableOp", "VarHandleOp", "Prod",
             "GatherV2"}


def _static(shape) -> list[int] | None:
    dims = shape.as_list() if shape.rank is not None else None
    if dims is None or any(d is None for d in dims):
        return None
    return dims


def static_costs(model, input_size: int, *, weight_bytes: int = 4,
                 activation_bytes: int = 4) -> dict:
    """Parameters, MACs and an estimate of memory traffic of one batch-1 inference.

    The model is traced at [1, S, S, 3] and frozen (functions inlined); MACs are counted on the
    TF graph, so every matrix product is included whatever layer made it: Conv2D
    (out_h*out_w*c_out*k_h*k_w*c_in/groups), DepthwiseConv2dNative (out elements * k_h*k_w),
    MatMul / BatchMatMul (batch*M*K*N: Dense, Dense on tokens via Tensordot, q·kᵀ and attn·v),
    Conv2DBackpropInput and Einsum. Element-wise ops are not counted as MACs.

    Memory traffic: `weight_bytes` per parameter, read once, plus every computed tensor
    (outputs of ops other than reshape-like views and constants) written once and read once at
    `activation_bytes` per element: an estimate for a runtime without fusion (fusion lowers it).

    Returns: dict(params, non_trainable_params, macs, macs_by_op, weight_bytes,
      activation_bytes, memory_traffic_bytes, input_size).
    """
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    from models.compat import tf

    s = int(input_size)
    spec = tf.TensorSpec([1, s, s, 3], tf.float32)
    fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    frozen = convert_variables_to_constants_v2(fn)
    graph = frozen.graph
    macs_by_op: dict[str, int] = {}
    act_elems = 0

    def add(kind, n):
        macs_by_op[kind] = macs_by_op.get(kind, 0) + int(n)

    for op in graph.get_operations():
        outs = [_static(o.shape) for o in op.outputs]
        if op.type not in _VIEW_OPS and op.outputs and op.type != "Const":
            for o, dims in zip(op.outputs, outs):
                if dims is not None and o.dtype.is_floating:
                    act_elems += int(np.prod(dims))
        if op.type in ("Conv2D", "DepthwiseConv2dNative", "Conv2DBackpropInput"):
            w = _static(op.inputs[1].shape)
            out = outs[0]
            if w is None or out is None:
                continue
            kh, kw = w[0], w[1]
            if op.type == "Conv2D":
                add("Conv2D", np.prod(out) * kh * kw * w[2])  # w[2] = c_in / groups
            elif op.type == "DepthwiseConv2dNative":
                add("DepthwiseConv2D", np.prod(out) * kh * kw)
            else:
                x = _static(op.inputs[2].shape)
                add("Conv2DTranspose", np.prod(x) * kh * kw * w[2])
        elif op.type in ("MatMul", "BatchMatMulV2", "BatchMatMulV3", "BatchMatMul"):
            a, out = _static(op.inputs[0].shape), outs[0]
            if a is None or out is None:
                continue
            adj_a = op.get_attr("transpose_a") if op.type == "MatMul" else op.get_attr("adj_x")
            k = a[-2] if adj_a else a[-1]
            add(op.type.replace("V2", "").replace("V3", ""), np.prod(out) * k)
        elif op.type == "Einsum":
            eq = op.get_attr("equation").decode()
            ins, res = eq.replace(" ", "").split("->")
            sizes = {}
            for term, t in zip(ins.split(","), op.inputs):
                for ch, d in zip(term, _static(t.shape) or []):
                    sizes[ch] = d
            add("Einsum", np.prod([sizes[c] for c in set(ins.replace(",", ""))]))
    params = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    non_trainable = int(sum(np.prod(w.shape) for w in model.non_trainable_weights))
    w_bytes = params * weight_bytes
    a_bytes = act_elems * activation_bytes
    return dict(
        input_size=s,
        params=params,
        non_trainable_params=non_trainable,
        macs=int(sum(macs_by_op.values())),
        macs_by_op=macs_by_op,
        weight_bytes=int(w_bytes),
        activation_bytes=int(a_bytes),
        memory_traffic_bytes=int(w_bytes + 2 * a_bytes),
    )
