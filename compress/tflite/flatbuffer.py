"""Read (and patch in place) the flatbuffer of a .tflite file with the schema in ai_edge_litert.

A `.tflite` file is a flatbuffer of the TFLite schema (`tensorflow/compiler/mlir/lite/schema/
schema.fbs`); `ai_edge_litert` (and `tensorflow.lite.python`) ship its generated Python module
`schema_py_generated`. This module turns a file into plain Python records (ops with their type
name, inputs and outputs; tensors with name, dtype, shape and quantization) and offers one edit:
overwriting a tensor's per-tensor quantization parameters in place (the scale and zero-point
vectors keep their length, so the bytes are changed where they are and nothing is repacked).

Only the main subgraph (index 0) is read: the converter puts every op of an image classifier there.

The edits the fast int8 path makes (`compress.tflite.fast_int8`) live here too:
`symmetric_bmm_rhs` (zero point 0 for the right-hand BATCH_MATMUL inputs XNNPACK refuses
otherwise) and `run_in_float` (ops run in float between a DEQUANTIZE and a QUANTIZE).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

try:  # the LiteRT wheel is the runtime of the project; TF ships the same generated module
    from ai_edge_litert import schema_py_generated as schema
except ImportError:  # pragma: no cover
    from tensorflow.lite.python import schema_py_generated as schema


_OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


_DTYPE_NAMES = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}


@dataclasses.dataclass
class Tensor:
    index: int
    name: str
    dtype: str  # "FLOAT32", "INT8", "FLOAT16", ...
    shape: tuple
    shape_signature: tuple  # -1 for dynamic dimensions (empty when the file has none)
    buffer: int
    has_data: bool  # a constant (weights, biases, shape constants)
    sparse: bool  # stored with TFLite sparsity metadata (EXPERIMENTAL_SPARSITY)
    scale: np.ndarray | None  # quantization scale(s), None when not quantized
    zero_point: np.ndarray | None


@dataclasses.dataclass
class Op:
    index: int
    type: str  # builtin name, "CUSTOM" for custom ops
    custom_code: str  # e.g. "FlexConv2D" for Flex ops, "" for builtins
    inputs: tuple  # tensor indices, -1 for an omitted optional input
    outputs: tuple


class TFLiteFile:
    """Parsed view of the main subgraph of a .tflite flatbuffer.

    Args:
      data: the file path or its bytes. Bytes are copied into a `bytearray`, which
        `set_symmetric_quantization` edits; `data_bytes()` returns the (edited) file.
    """

    def __init__(self, data: bytes | str | os.PathLike):
        if isinstance(data, (str, os.PathLike)):
            with open(data, "rb") as f:
                data = f.read()
        self._buf = bytearray(data)
        self._model = schema.Model.GetRootAsModel(self._buf, 0)
        if self._model.SubgraphsLength() < 1:
            raise ValueError("the .tflite file has no subgraph")
        self.num_subgraphs = self._model.SubgraphsLength()
        self._sg = self._model.Subgraphs(0)
        self.tensors = [self._read_tensor(i) for i in range(self._sg.TensorsLength())]
        self.ops = [self._read_op(i) for i in range(self._sg.OperatorsLength())]
        self.inputs = tuple(int(i) for i in self._sg.InputsAsNumpy())
        self.outputs = tuple(int(i) for i in self._sg.OutputsAsNumpy())
        self.producer = {t: op.index for op in self.ops for t in op.outputs}
        self.consumers: dict[int, list[int]] = {}
        for op in self.ops:
            for t in op.inputs:
                if t >= 0:
                    self.consumers.setdefault(t, []).append(op.index)

    # -- reading -----------------------------------------------------------------------------

    def _opcode_name(self, code_index: int) -> tuple[str, str]:
        oc = self._model.OperatorCodes(code_index)
        code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
        name = _OP_NAMES.get(code, f"BUILTIN_{code}")
        custom = oc.CustomCode()
        return name, (custom.decode() if custom else "")

    def _read_op(self, i: int) -> Op:
        op = self._sg.Operators(i)
        name, custom = self._opcode_name(op.OpcodeIndex())
        ins = tuple(int(x) for x in op.InputsAsNumpy()) if op.InputsLength() else ()
        outs = tuple(int(x) for x in op.OutputsAsNumpy()) if op.OutputsLength() else ()
        return Op(i, name, custom, ins, outs)

    def _buffer_size(self, b: int) -> int:
        buf = self._model.Buffers(b)
        if buf is None:
            return 0
        if buf.Offset() > 1:  # large models keep data after the flatbuffer
            return int(buf.Size())
        return int(buf.DataLength())

    def _read_tensor(self, i: int) -> Tensor:
        t = self._sg.Tensors(i)
        q = t.Quantization()
        scale = zp = None
        if q is not None and q.ScaleLength() > 0:
            scale = np.array(q.ScaleAsNumpy(), dtype=np.float32)
            zp = np.array(q.ZeroPointAsNumpy(), dtype=np.int64) if q.ZeroPointLength() else None
        sig = tuple(int(x) for x in t.ShapeSignatureAsNumpy()) if t.ShapeSignatureLength() else ()
        shape = tuple(int(x) for x in t.ShapeAsNumpy()) if t.ShapeLength() else ()
        return Tensor(
            index=i,
            name=(t.Name() or b"").decode(),
            dtype=_DTYPE_NAMES.get(t.Type(), str(t.Type())),
            shape=shape,
            shape_signature=sig,
            buffer=int(t.Buffer()),
            has_data=self._buffer_size(int(t.Buffer())) > 0,
            sparse=t.Sparsity() is not None,
            scale=scale,
            zero_point=zp,
        )

    def _buffer_view(self, tensor: int) -> np.ndarray | None:
        """The stored values of a constant tensor as a flat array viewing the file's bytes
        (writes edit the file); None if not constant or of an unknown type."""
        t = self.tensors[tensor]
        dtype = {"FLOAT32": np.float32, "FLOAT16": np.float16, "INT8": np.int8,
                 "UINT8": np.uint8, "INT16": np.int16, "INT32": np.int32,
                 "INT64": np.int64}.get(t.dtype)
        if not t.has_data or dtype is None:
            return None
        buf = self._model.Buffers(t.buffer)
        if buf.Offset() > 1:  # large models keep data after the flatbuffer
            raw = memoryview(self._buf)[buf.Offset(): buf.Offset() + buf.Size()]
        else:
            raw = buf.DataAsNumpy()  # a uint8 view into the file's bytes
        return np.frombuffer(raw, dtype=dtype)

    def buffer_array(self, tensor: int) -> np.ndarray | None:
        """The stored values of a constant tensor as a flat numpy array (None if not constant).

        For a sparse tensor these are the stored (non-pruned block) values only.
        """
        view = self._buffer_view(tensor)
        return None if view is None else view.copy()

    def data_bytes(self) -> bytes:
        return bytes(self._buf)

    # -- editing -----------------------------------------------------------------------------

    def _quant_vectors(self, tensor: int):
        q = self._sg.Tensors(tensor).Quantization()
        return q.ScaleAsNumpy(), q.ZeroPointAsNumpy()

    def set_symmetric_quantization(self, tensors: list[int]) -> float:
        """Gives `tensors` one common per-tensor int8 quantization with zero point 0, in place.

        Meant for a group of tensors joined by ops that need equal input and output parameters
        (RESHAPE, TRANSPOSE, ...). The new scale covers the union of the old representable
        ranges: max over the group of max(|min|, |max|) / 127, with min/max = (-128 - zp) * s and
        (127 - zp) * s. Ops at the group's border (FULLY_CONNECTED, BATCH_MATMUL, QUANTIZE, ...)
        read the parameters at prepare time, so they requantize to the new ones. The scale and
        zero-point vectors are views into the file's bytes, so nothing is repacked.

        Returns: the new scale.
        """
        addresses: dict[int, set] = {}
        for i in range(self._sg.TensorsLength()):
            q = self._sg.Tensors(i).Quantization()
            if q is not None and q.ScaleLength() and q.ZeroPointLength():
                s, z = self._quant_vectors(i)
                addresses.setdefault(s.__array_interface__["data"][0], set()).add(i)
                addresses.setdefault(z.__array_interface__["data"][0], set()).add(i)
        targets = set(tensors)
        bound = 0.0
        for i in tensors:
            t = self.tensors[i]
            if (t.dtype != "INT8" or t.scale is None or t.scale.size != 1 or t.has_data
                    or t.zero_point is None):
                raise ValueError(f"tensor {t.name!r} is not a per-tensor int8 activation")
            s, z = self._quant_vectors(i)
            for vec in (s, z):
                shared = addresses[vec.__array_interface__["data"][0]] - targets
                if shared:
                    raise ValueError(f"quantization of {t.name!r} is shared with tensors {shared}")
            old_s, old_z = float(s[0]), int(z[0])
            bound = max(bound, abs((-128 - old_z) * old_s), abs((127 - old_z) * old_s))
        new_s = np.float32(bound / 127.0)
        for i in tensors:
            s, z = self._quant_vectors(i)
            s[0] = new_s
            z[0] = 0
            self.tensors[i].scale = np.array([new_s], np.float32)
            self.tensors[i].zero_point = np.array([0], np.int64)
        return float(new_s)

    def requantize_constant_symmetric(self, tensor: int) -> float:
        """Re-encodes a per-tensor int8 constant with zero point 0, in place: values
        v = s * (q - zp) get the scale max|v| / 127 and q' = round(v / s') (at most half a new
        step of error). For a constant right-hand BATCH_MATMUL input (XNNPACK refuses a non-zero
        zero point there), e.g. tokens computed from learned constants only.

        Returns: the new scale.
        """
        t = self.tensors[tensor]
        if (t.dtype != "INT8" or not t.has_data or t.scale is None or t.scale.size != 1
                or t.zero_point is None):
            raise ValueError(f"tensor {t.name!r} is not a per-tensor int8 constant")
        data = self._buffer_view(tensor)
        s, z = self._quant_vectors(tensor)
        values = (data.astype(np.float32) - float(z[0])) * float(s[0])
        new_s = np.float32(max(float(np.abs(values).max()), 1e-12) / 127.0)
        data[:] = np.clip(np.round(values / new_s), -127, 127).astype(np.int8)
        s[0], z[0] = new_s, 0
        t.scale = np.array([new_s], np.float32)
        t.zero_point = np.array([0], np.int64)
        return float(new_s)

    def widen_narrow_ranges(self, min_width: float) -> list[int]:
        """Widens, in place, every per-tensor calibration range (the min/max that
        `_experimental_calibrate_only` records) narrower than `min_width` to `min_width`: kept
        at its lower end when it is >= 0 (a ReLU output stays non-negative), centred otherwise.

        Such a range comes from a unit that never fires on the calibration set or a tensor that
        does not change (attention weights of 1/3 everywhere); quantized as it is, its scale is
        ~1e-8, and the ops reading or writing it fail XNNPACK's scale-ratio limits, which in
        ai-edge-litert 2.3.0 can abort the process with a double free.

        Returns: the indices of the widened tensors.
        """
        out = []
        for i in range(self._sg.TensorsLength()):
            q = self._sg.Tensors(i).Quantization()
            if q is None or q.MinLength() != 1 or q.MaxLength() != 1:
                continue
            lo, hi = q.MinAsNumpy(), q.MaxAsNumpy()  # views into the file's bytes
            a, b = float(lo[0]), float(hi[0])
            if not (b - a < min_width):
                continue
            if a >= 0.0:
                lo[0], hi[0] = a, a + min_width
            else:
                mid = 0.5 * (a + b)
                lo[0], hi[0] = mid - 0.5 * min_width, mid + 0.5 * min_width
            out.append(i)
        return out


def run_in_float(model_bytes: bytes, op_indices) -> bytes:
    """The file with the given int8 ops of the main subgraph computed in float: a DEQUANTIZE in
    front of each int8 activation input, a QUANTIZE after each int8 output (which keeps its
    tensor and parameters, so the rest of the graph is unchanged). Repacks the flatbuffer
    (schema object API).

    For ops XNNPACK takes in float only (GELU, HARD_SWISH, ...) that the converter quantized
    anyway, as it does for a QAT model whose fake-quant nodes surround them: the int8 op would
    run outside the delegate and split the graph; in float it computes what the int8 kernel
    approximates (the same input and output quantization).
    """
    try:
        from ai_edge_litert.tools import flatbuffer_utils as fbu
    except ImportError:  # pragma: no cover
        from tensorflow.lite.tools import flatbuffer_utils as fbu

    targets = set(int(i) for i in op_indices)
    if not targets:
        return bytes(model_bytes)
    m = fbu.read_model_from_bytearray(bytearray(model_bytes))
    sg = m.subgraphs[0]
    op = schema.BuiltinOperator

    def opcode(code: int) -> int:
        for i, oc in enumerate(m.operatorCodes):
            if max(oc.builtinCode, oc.deprecatedBuiltinCode) == code:
                return i
        oc = schema.OperatorCodeT()
        oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = code, min(code, 127), 2
        m.operatorCodes.append(oc)
        return len(m.operatorCodes) - 1

    def float_twin(t: int, suffix: str) -> int:
        src = sg.tensors[t]
        twin = schema.TensorT()
        twin.shape, twin.shapeSignature = src.shape, src.shapeSignature
        twin.type = schema.TensorType.FLOAT32
        twin.name = (src.name or b"") + suffix.encode()
        m.buffers.append(schema.BufferT())
        twin.buffer = len(m.buffers) - 1
        sg.tensors.append(twin)
        return len(sg.tensors) - 1

    def convert(code: int, src: int, dst: int):
        new = schema.OperatorT()
        new.opcodeIndex, new.inputs, new.outputs = opcode(code), [src], [dst]
        return new

    def is_int8_activation(t: int) -> bool:
        tt = sg.tensors[t]
        data = m.buffers[tt.buffer].data if tt.buffer < len(m.buffers) else None
        return tt.type == schema.TensorType.INT8 and (data is None or len(data) == 0)

    ops = []
    for i, o in enumerate(sg.operators):
        if i not in targets:
            ops.append(o)
            continue
        ins, outs, after = list(o.inputs), list(o.outputs), []
        for j, t in enumerate(ins):
            if t >= 0 and is_int8_activation(t):
                ins[j] = float_twin(t, "/dequantize")
                ops.append(convert(op.DEQUANTIZE, t, ins[j]))
        for j, t in enumerate(outs):
            if is_int8_activation(t):
                outs[j] = float_twin(t, "/float")
                after.append(convert(op.QUANTIZE, outs[j], t))
        o.inputs, o.outputs = ins, outs
        ops.append(o)
        ops.extend(after)
    sg.operators = ops
    return bytes(fbu.convert_object_to_bytearray(m))


def op_counts(ops) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in ops:
        counts[op.type] = counts.get(op.type, 0) + 1
    return dict(sorted(counts.items()))


# Ops whose int8 input and output share quantization parameters (the BMM-RHS rewrite follows
# them): op type -> indices of the data inputs.
# Ops whose int8 input and output must share quantization parameters (XNNPACK refuses a PAD
# or resize whose input was re-quantized without its output): symmetric groups cross them.
_SAME_SCALE = {"RESHAPE": (0,), "TRANSPOSE": (0,), "SQUEEZE": (0,), "EXPAND_DIMS": (0,),
               "PAD": (0,), "PADV2": (0,), "MAX_POOL_2D": (0,), "DEPTH_TO_SPACE": (0,),
               "SPACE_TO_DEPTH": (0,), "RESIZE_BILINEAR": (0,), "RESIZE_NEAREST_NEIGHBOR": (0,),
               "STRIDED_SLICE": (0,), "SLICE": (0,), "GATHER": (0,), "SPLIT": (1,),
               "SPLIT_V": (0,), "UNPACK": (0,), "BROADCAST_TO": (0,), "PACK": None,
               "CONCATENATION": None}


def _asymmetric_bmm_rhs(f: TFLiteFile):
    """(op, right-hand tensor) of every int8 BATCH_MATMUL whose right-hand input has a non-zero
    zero point, which XNNPACK refuses."""
    for op in f.ops:
        if op.type != "BATCH_MATMUL" or len(op.inputs) < 2:
            continue
        rhs = f.tensors[op.inputs[1]]
        if rhs.dtype == "INT8" and rhs.zero_point is not None and int(rhs.zero_point[0]) != 0:
            yield op, rhs


def _bmm_rhs_groups(f: TFLiteFile) -> list[list[int]]:
    """Tensor groups, one per int8 BATCH_MATMUL right-hand activation with a non-zero zero point,
    closed under same-scale ops (RESHAPE/TRANSPOSE/...); groups reaching a constant are skipped."""
    groups, done = [], set()
    for _, rhs in _asymmetric_bmm_rhs(f):
        if rhs.has_data or rhs.index in done:
            continue
        group, stack, ok = set(), [rhs.index], True
        while stack:
            t = stack.pop()
            if t in group or t < 0:
                continue
            tt = f.tensors[t]
            if tt.has_data or tt.dtype != "INT8" or tt.scale is None or tt.scale.size != 1:
                ok = False
                break
            group.add(t)
            prod = f.producer.get(t)
            if prod is not None and f.ops[prod].type in _SAME_SCALE:
                p = f.ops[prod]
                idx = _SAME_SCALE[p.type]
                data = [p.inputs[i] for i in idx] if idx is not None else list(p.inputs)
                stack += data + list(p.outputs)
            for c in f.consumers.get(t, []):
                cop = f.ops[c]
                if cop.type in _SAME_SCALE:
                    idx = _SAME_SCALE[cop.type]
                    data = [cop.inputs[i] for i in idx] if idx is not None else list(cop.inputs)
                    if t in data:
                        stack += data + list(cop.outputs)
        done |= group
        if ok:
            groups.append(sorted(group))
    return groups


def symmetric_bmm_rhs(model_bytes: bytes) -> tuple[bytes, int]:
    """Gives every int8 BATCH_MATMUL right-hand input zero point 0 (in place, see module doc).

    Returns: (the edited file, the number of BATCH_MATMUL inputs rewritten).
    """
    f = TFLiteFile(model_bytes)
    groups = _bmm_rhs_groups(f)
    for g in groups:
        f.set_symmetric_quantization(g)
    constants = _bmm_constant_rhs(f)
    for t in constants:
        f.requantize_constant_symmetric(t)
    return f.data_bytes(), len(groups) + len(constants)


def _bmm_constant_rhs(f: TFLiteFile) -> list[int]:
    """Constant per-tensor int8 right-hand BATCH_MATMUL inputs with a non-zero zero point that
    nothing else reads (Mobile-Former's first bridge: its tokens are the learned constants)."""
    return [rhs.index for op, rhs in _asymmetric_bmm_rhs(f)
            if rhs.has_data and rhs.scale is not None and rhs.scale.size == 1
            and f.consumers.get(rhs.index) == [op.index]]
