"""models.torch_pickle: `.pth` files written by `torch.save` in the zip and the legacy layout
read without torch, equal to torch's own values; bad files refused in one line."""

import collections
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from tests.helpers import REPO, require_module as require

from models import torch_pickle

FORMATS = {"zip": True, "legacy": False}


@pytest.fixture(scope="module")
def torch():
    return require("torch")


def save(torch, obj, path, fmt):
    torch.save(obj, path, _use_new_zipfile_serialization=FORMATS[fmt])
    return path


def tensors(torch):
    """float32/float16/int64/bool/float64, views that are not contiguous or start inside
    their storage, a 0-d tensor, an empty one and two tensors sharing one storage."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 7, generator=g)
    return {
        "f32": torch.randn(3, 4, 5, generator=g),
        "f16": torch.randn(6, 2, generator=g).half(),
        "f64": torch.randn(4, generator=g).double(),
        "i64": torch.arange(-5, 7, dtype=torch.int64).reshape(3, 4),
        "bool": torch.tensor([True, False, True]),
        "transposed": base.t(),
        "sliced": base[1:4, ::2],  # offset 7, strides (7, 2)
        "shares_base": base,
        "permuted": torch.randn(2, 3, 4, generator=g).permute(2, 0, 1),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
    }


def as_numpy(t):
    return t.detach().numpy()


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_tensors_equal_torchs_values(torch, tmp_path, fmt):
    ref = tensors(torch)
    path = save(torch, ref, tmp_path / "t.pth", fmt)
    got = torch_pickle.load(path)
    assert set(got) == set(ref)
    for key, t in ref.items():
        a = got[key]
        assert isinstance(a, np.ndarray) and a.dtype == as_numpy(t).dtype, key
        assert a.shape == tuple(t.shape), key
        np.testing.assert_array_equal(a, as_numpy(t), err_msg=key)
        assert a.flags.c_contiguous and a.flags.owndata or a.size == 0


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_bfloat16_becomes_exact_float32(torch, tmp_path, fmt):
    t = torch.randn(4, 3).to(torch.bfloat16)
    got = torch_pickle.load(save(torch, {"w": t}, tmp_path / "b.pth", fmt))["w"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, t.float().numpy())


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_module_state_dict_nested_in_a_training_checkpoint(torch, tmp_path, fmt):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                              torch.nn.Linear(4, 2))
    net[1].running_var.uniform_(0.5, 1.5)
    ckpt = {"state_dict": net.state_dict(), "epoch": 7, "best": [0.5, "x"],
            "metric": np.float64(0.25),
            "params": {"w": torch.nn.Parameter(torch.ones(2, 2))}}
    got = torch_pickle.load(save(torch, ckpt, tmp_path / "ckpt.pth", fmt))
    assert got["epoch"] == 7 and got["best"] == [0.5, "x"]
    assert got["metric"] == 0.25 and got["metric"].dtype == np.float64
    sd = got["state_dict"]
    assert isinstance(sd, collections.OrderedDict) and list(sd) == list(net.state_dict())
    for key, t in net.state_dict().items():
        np.testing.assert_array_equal(sd[key], as_numpy(t), err_msg=key)
    assert sd["1.num_batches_tracked"].dtype == np.int64
    np.testing.assert_array_equal(got["params"]["w"], np.ones((2, 2), np.float32))


def test_the_legacy_file_starts_with_the_legacy_magic(torch, tmp_path):
    """(So the legacy tests above do test the legacy reader.)"""
    path = save(torch, {"w": torch.ones(2)}, tmp_path / "w.pth", "legacy")
    assert path.read_bytes()[:14] == bytes.fromhex("80028a0a6cfc9c46f9206aa85019")


def assert_refused(path, *fragments):
    with pytest.raises(ValueError) as info:
        torch_pickle.load(path)
    message = str(info.value)
    assert "\n" not in message and os.path.basename(path) in message, message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_truncated_file_is_refused_in_one_line(torch, tmp_path, fmt):
    full = save(torch, tensors(torch), tmp_path / "full.pth", fmt).read_bytes()
    for cut in (len(full) - 9, len(full) // 2, 40):
        path = tmp_path / f"cut{cut}.pth"
        path.write_bytes(full[:cut])
        assert_refused(path, "cannot read")


class Namespace:  # a class of a training script: its module is not on the allowed list
    lr = 0.1


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_forbidden_global_is_refused_in_one_line(torch, tmp_path, fmt):
    path = save(torch, {"w": torch.ones(2), "args": Namespace()}, tmp_path / "args.pth", fmt)
    assert_refused(path, "refusing to load the global", "Namespace")


class Exploit:
    def __reduce__(self):
        return os.system, ("echo pwned > pwned.txt",)


def test_code_in_the_pickle_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(Exploit(), protocol=2))
    assert_refused(path, "refusing to load the global", "system")
    assert not (tmp_path / "pwned.txt").exists()


def test_foreign_files_are_refused(tmp_path):
    path = tmp_path / "random.bin"
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    assert_refused(path, "cannot read")
    path = tmp_path / "plain.pth"
    path.write_bytes(pickle.dumps({"w": [1, 2]}, protocol=2))
    assert_refused(path, "wrong magic number")
    assert_refused(tmp_path / "absent.pth", "No such file")


def test_strides_reaching_past_the_storage_are_refused():
    st = torch_pickle._Storage("0", torch_pickle._StorageType("FloatStorage"), 6)
    st.data = np.arange(6, dtype=np.float32)
    ok = torch_pickle._TensorRef(st, 1, (2, 2), (3, 1))
    np.testing.assert_array_equal(torch_pickle._tensor(ok), [[1, 2], [4, 5]])
    with pytest.raises(ValueError, match="reaches past its storage"):
        torch_pickle._tensor(torch_pickle._TensorRef(st, 1, (2, 3), (3, 1)))


def test_reading_never_imports_torch(torch, tmp_path):
    """In a process where torch cannot be imported: `torch_pickle.load` and the checkpoint reader
    of the converters (`timm_convert.read_state_dict`) read a state dict in both layouts."""
    sd = {"a.weight": torch.randn(3, 2).t(), "a.bias": torch.randn(3).half(),
          "n": torch.tensor(5)}
    paths = [str(save(torch, {"state_dict": sd}, tmp_path / f"{fmt}.pth", fmt)) for fmt in FORMATS]
    np.savez(tmp_path / "ref.npz", **{k: v.numpy() for k, v in sd.items()})
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now raises ImportError
        import numpy as np
        from models import torch_pickle, timm_convert
        ref = np.load({str(tmp_path / "ref.npz")!r})
        for path in {paths!r}:
            raw = torch_pickle.load(path)["state_dict"]
            for k in ref.files:
                assert raw[k].dtype == ref[k].dtype and np.array_equal(raw[k], ref[k]), k
            sd = timm_convert.read_state_dict(path)
            assert sd["a.bias"].dtype == np.float32
            assert np.array_equal(sd["a.bias"], ref["a.bias"])
            assert np.array_equal(sd["a.weight"], ref["a.weight"]) and sd["n"] == 5
            print("read", sorted(sd))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("read ['a.bias', 'a.weight', 'n']") == 2
