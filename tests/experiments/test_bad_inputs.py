"""Every bad input a user can type is refused before any work, in one line that names it, with
a non-zero exit and no traceback: flags, --config values and their ranges, --teacher files,
--data folders and tfds names, the --workdir, a full disk, a second run on a locked workdir.

The cases run through `python -m tests.experiments.pipeline_cases`: one process imports
TensorFlow once and runs each command line of `python -m experiments.pipeline` in a forked child.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO, import_torch_timm, pipeline_command, require_module

WORKER = ["-m", "tests.experiments.pipeline_cases"]
GOOD = {"student": "mobilevit_xxs", "teacher": "vit_tiny_patch16", "data": "{data}",
        "workdir": "{tmp}/wd"}


def _jpeg(path, seed):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path, "JPEG")


def _keras_files(tmp):
    """Saved Keras models that are not usable teachers."""
    from models.compat import keras

    inp = keras.Input((16, 16, 3))
    keras.Model(inp, keras.layers.Conv2D(4, 3)(inp)).save(str(tmp / "segmenter.keras"))
    x = keras.layers.GlobalAveragePooling2D()(inp)
    keras.Model(inp, keras.layers.Dense(7)(x)).save(str(tmp / "seven.keras"))
    (tmp / "junk.keras").write_bytes(b"not a zip file")
    (tmp / "notes.txt").write_text("a teacher? no")


def _folder(root, splits):
    """splits: {split: {class: number of images}}."""
    for split, classes in splits.items():
        for c, n in classes.items():
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _jpeg(root / split / c / f"{i}.JPEG", i)
    return root


# (id, {flag: value} replacing GOOD's or adding, expected regex on the last stderr line, extra)
CASES = [
    ("student", {"student": "resnet50"}, r"--student: unknown model 'resnet50'; accepted: .*mobilevit_xxs", {}),
    ("teacher_name", {"teacher": "nope"}, r"--teacher: 'nope' is neither a registry name .*vit_tiny_patch16", {}),
    ("preset", {"preset": "medium"}, r"--preset=medium: value should be one of <smoke\|quick\|full>", {}),
    ("stage", {"stages": "distill,polish"}, r"--stages: unknown stage\(s\) \['polish'\]; accepted: teacher,", {}),
    ("strategy", {"strategy": "horovod"}, r"--strategy=horovod: value should be one of", {}),
    ("export_size", {"export_size": "100"}, r"--export_size: 100 is not a positive multiple of 32", {}),
    ("unknown_key", {"config.distill.stepz": "3"}, r'unknown --config key stepz Did you mean "steps"', {}),
    ("non_integer", {"config.distill.steps": "abc"}, r"--config.distill.steps=abc: invalid literal for int", {}),
    ("kind", {"config.distill.kind": "medium"}, r"--config.distill.kind: 'medium' is not accepted; accepted", {}),
    ("sparsity", {"config.prune.target_sparsity": "1.5"}, r"--config.prune.target_sparsity: 1.5 is not accepted; accepted: a number in \[0, 1\)", {}),
    ("m_by_n", {"config.prune.m_by_n": "3:8"}, r"--config.prune.m_by_n: '3:8' is not accepted; accepted: \('', '2:4'\)", {}),
    ("float_layers", {"config.export.float_layers": "('stage9_*',)"}, r"--config.export.float_layers: 'stage9_\*' matches no layer of mobilevit_xxs", {}),
    ("unknown_flag", {"bogus": "1"}, r"Unknown command line flag 'bogus'", {}),
    ("negative_steps", {"config.distill.steps": "-5"}, r"--config.distill.steps: -5 is not accepted; accepted: an integer >= 1", {}),
    ("negative_lr", {"config.distill.lr": "-0.1"}, r"--config.distill.lr: -0.1 is not accepted; accepted: a number > 0", {}),
    ("weight_decay", {"config.teacher.weight_decay": "-1.0"}, r"--config.teacher.weight_decay: -1.0 is not accepted; accepted: a number >= 0", {}),
    ("warmup", {"config.qat.warmup_steps": "99"}, r"--config.qat.warmup_steps: 99 is not accepted; accepted: an integer in \[0, steps=4\]", {}),
    ("min_lr_ratio", {"config.prune.min_lr_ratio": "2.0"}, r"--config.prune.min_lr_ratio: 2.0 is not accepted; accepted: a number in \[0, 1\]", {}),
    ("label_smoothing", {"config.distill.label_smoothing": "1.0"}, r"--config.distill.label_smoothing: 1.0 is not accepted; accepted: a number in \[0, 1\)", {}),
    ("alpha", {"config.distill.alpha": "1.5"}, r"--config.distill.alpha: 1.5 is not accepted", {}),
    ("kd_alpha", {"config.qat.kd_alpha": "-0.5"}, r"--config.qat.kd_alpha: -0.5 is not accepted", {}),
    ("temperature", {"config.prune.kd_temperature": "0.0"}, r"--config.prune.kd_temperature: 0.0 is not accepted; accepted: a number > 0", {}),
    ("renamed_key", {"config.qat.temperature": "0.0"}, r"--config.qat.kd_temperature: 0.0 is not accepted", {}),
    ("sampler_order", {"config.distill.sampler.min_size": "128"}, r"--config.distill.sampler.min_size: 128 is not accepted; accepted: .*min_size <= base_size <= max_size", {}),
    ("sampler_multiple", {"config.qat.sampler.base_size": "100"}, r"--config.qat.sampler.base_size: 100 is not accepted; accepted: a positive multiple of 32", {}),
    ("n_scales", {"config.distill.sampler.n_scales": "0"}, r"--config.distill.sampler.n_scales: 0 is not accepted", {}),
    ("begin_end_frac", {"config.prune.begin_frac": "0.8"}, r"--config.prune.end_frac: 0.7 is not accepted; accepted: a number in \(begin_frac=0.8, 1\]", {}),
    ("threads", {"config.benchmark.threads": "(-1,)"}, r"--config.benchmark.threads\[0\]: -1 is not accepted; accepted: an integer >= 0", {}),
    ("runs", {"config.benchmark.runs": "0"}, r"--config.benchmark.runs: 0 is not accepted; accepted: an integer >= 1", {}),
    ("delegate", {"config.benchmark.delegates": "('gpu',)"}, r"--config.benchmark.delegates\[0\]: 'gpu' is not accepted", {}),
    ("format", {"config.export.formats.qat": "('int4',)"}, r"--config.export.formats.qat\[0\]: 'int4' is not accepted", {}),
    ("export_size_fixed_student", {"student": "efficientformer_l1", "export_size": "256"}, r"--export_size: efficientformer_l1 is built for 224 px only .*; accepted: 224", {}),
    ("export_size_config", {"config.export.size": "100"}, r"--config.export.size: 100 is not accepted; accepted: 0 .* or a positive multiple of 32", {}),
    ("representative", {"config.export.representative_images": "0"}, r"--config.export.representative_images: 0 is not accepted", {}),
    ("crop_pct", {"config.data.crop_pct": "0.0"}, r"--config.data.crop_pct: 0.0 is not accepted; accepted: a number in \(0, 1\]", {}),
    ("mixup", {"config.data.mixup": "-1.0"}, r"--config.data.mixup: -1.0 is not accepted", {}),
    ("teacher_size", {"config.teacher.input_size": "100"}, r"--config.teacher.input_size: 100 is not accepted; accepted: 0 \(the teacher's own size\) or a positive multiple of 16", {}),
    ("checkpoint_every", {"config.distill.checkpoint_every": "0"}, r"--config.distill.checkpoint_every: 0 is not accepted", {}),
    ("mixed_precision", {"config.mixed_precision": "float16"}, r"--config.mixed_precision: 'float16' is not accepted; accepted: \('float32', 'mixed_bfloat16', 'mixed_float16', 'auto'\)", {}),
    ("npz_random_bytes", {"teacher": "{tmp}/random.npz"}, r"--teacher: cannot read '.*random.npz' as a Google ViT .npz", {}),
    ("npz_without_vit_keys", {"teacher": "{tmp}/nokeys.npz"}, r"--teacher: '.*nokeys.npz' is not a Google ViT checkpoint \(no 'embedding/kernel' key\)", {}),
    ("npz_missing_keys", {"teacher": "{tmp}/width100.npz"}, r"--teacher: '.*width100.npz' lacks key 'Transformer/encoderblock_0/", {}),
    ("teacher_folder_empty", {"teacher": "{tmp}/not_a_teacher"}, r"--teacher: '.*not_a_teacher' is a folder without config.json", {}),
    ("teacher_file_other", {"teacher": "{tmp}/random.bin"}, r"--teacher: cannot read '.*random.bin' as a timm checkpoint", {}),
    ("safetensors_random_bytes", {"teacher": "{tmp}/random.safetensors"}, r"--teacher: cannot read '.*random.safetensors'", {}),
    ("resnet_checkpoint", {"teacher": "{tmp}/resnet18.pth"}, r"--teacher: '.*resnet18.pth' is not a ViT checkpoint: expected timm ViT keys", {}),
    ("keras_not_a_classifier", {"teacher": "{tmp}/segmenter.keras"}, r"--teacher: '.*segmenter.keras': not an image classifier", {}),
    ("keras_not_a_model", {"teacher": "{tmp}/junk.keras"}, r"--teacher: '.*junk.keras': cannot load it as a saved Keras model", {}),
    ("keras_head_fits_nothing", {"teacher": "{tmp}/seven.keras"}, r"--teacher: '.*seven.keras': its head has 7 classes, which matches neither the data \(2 classes\) nor ImageNet-1k \(1000\)", {}),
    ("data_partly_wnids", {"teacher": "{tmp}/seven.keras", "data": "{tmp}/partly_wnids"}, r"--teacher: 1 of the 2 data classes are not ImageNet wnids \(b\) while 1 are", {}),
    ("keras_app_unknown", {"teacher": "keras.applications.ResNet5"}, r"--teacher: keras.applications.ResNet5 does not exist; did you mean ResNet50", {}),
    ("teacher_plain_file", {"teacher": "{tmp}/notes.txt"}, r"--teacher: '.*notes.txt': not a teacher file; accepted: a timm", {}),
    ("teacher_folder_bad_weights", {"teacher": "{tmp}/bad_teacher_stage"}, r"--teacher=.*bad_teacher_stage: not a teacher folder of this project", {}),
    ("structured_keep", {"config.prune.method": "structured", "config.prune.keep": "1.5"}, r"--config.prune.keep: 1.5 is not accepted; accepted: a number in \(0, 1\]", {}),
    ("structured_family", {"config.prune.method": "structured", "student": "vit_tiny_patch16"}, r"structured pruning supports efficientformer_\*, mobile_former_\*, mobilevit_\*; not vit_tiny_patch16", {}),
    ("structured_out_of_reach", {"config.prune.method": "structured", "config.prune.keep": "0.1"}, r"--config.prune.keep=0.1 is out of reach for mobilevit_xxs: .* at least 0\.\d+ of its MACs", {}),
    ("structured_target_ms_out_of_reach", {"config.prune.method": "structured", "config.prune.target_ms": "0.001", "stages": "prune"}, r"--config.prune.target_ms=0.001 is out of reach for mobilevit_xxs at 64 px: its smallest structured cut .* runs in \d+\.\d+ ms as int8 on this host's XNNPACK at --config.prune.target_threads=1", {}),
    ("magnitude_target_ms", {"config.prune.method": "magnitude", "config.prune.target_ms": "5.0"}, r"--config.prune.target_ms: a latency budget needs --config.prune.method=structured", {}),
    ("target_threads", {"config.prune.target_threads": "0"}, r"--config.prune.target_threads: 0 is not accepted; accepted: an integer >= 1", {}),
    ("prune_method", {"config.prune.method": "channels"}, r"--config.prune.method: 'channels' is not accepted; accepted: \('magnitude', 'structured'\)", {}),
    ("cache_with_mixup", {"config.data.mixup": "0.8"}, r"teacher_cache.views: the teacher cache cannot be combined", {}),
    ("workdir_is_file", {"workdir": "{tmp}/random.bin"}, r"--workdir=.*random.bin: exists and is not a folder", {}),
    ("workdir_under_file", {"workdir": "{tmp}/random.bin/sub"}, r"--workdir=.*random.bin/sub: cannot create or write it \(Not a directory", {}),
    ("workdir_proc", {"workdir": "/proc/vit_compress_test/wd"}, r"--workdir=/proc/vit_compress_test/wd: cannot create or write it", {}),
    ("data_missing", {"data": "{tmp}/nowhere"}, r"--data=.*nowhere: folder .*nowhere does not exist", {}),
    ("data_no_val", {"data": "{tmp}/no_val"}, r"--data=.*no_val: split 'val' not found", {}),
    ("data_empty_class", {"data": "{tmp}/empty_class"}, r"--data=.*empty_class: class folder .*train/b has no images", {}),
    ("data_val_classes_differ", {"data": "{tmp}/val_differs"}, r"--data=.*val_differs: classes of .*val differ from .*train: only in val: \['c'\]", {}),
    ("data_undecodable", {"data": "{tmp}/all_bad"}, r"--data=.*all_bad: split 'train' has no decodable images", {}),
    ("tfds_offline", {"data": "tfds:imagenette/160px-v2"}, r"--data=tfds:imagenette/160px-v2: the dataset is not prepared in .* this machine is offline .*tfds build", {"offline": True}),
    ("tfds_unknown", {"data": "tfds:no_such_dataset_xyz"}, r"--data=tfds:no_such_dataset_xyz: unknown TensorFlow Datasets name", {}),
    ("disk_full", {"data": "{tmp}/good", "stages": "teacher"}, r"FATAL disk full in the teacher stage writing .*/teacher/config.json: .*No space left on device; [\d,]+ bytes free under --workdir=", {"disk_full": True}),
]

# refused once a stage has started: the disk filling up in the teacher stage; a latency budget,
# checked when the prune stage starts (every other case is refused before any stage)
STAGES_RAN = ("disk_full", "structured_target_ms_out_of_reach")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_inputs")
    (tmp / "random.npz").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp / "random.bin").write_bytes(np.random.default_rng(1).bytes(64))
    np.savez(tmp / "nokeys.npz", a=np.zeros(3))
    np.savez(tmp / "width100.npz", **{"embedding/kernel": np.zeros((16, 16, 3, 100))})
    (tmp / "not_a_teacher").mkdir()
    (tmp / "random.safetensors").write_bytes(bytes(range(256)) * 16)
    (tmp / "bad_teacher_stage").mkdir()
    (tmp / "bad_teacher_stage" / "model.json").write_text(
        json.dumps({"name": "vit_tiny_patch16", "num_classes": 2, "overrides": {}}))
    (tmp / "bad_teacher_stage" / "weights.h5").write_bytes(b"truncated")
    torch, timm = import_torch_timm()
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), tmp / "resnet18.pth")
    good = {"a": 2, "b": 2}
    _folder(tmp / "good", {"train": good, "val": good})
    _folder(tmp / "partly_wnids", {"train": {"n01440764": 2, "b": 2},
                                   "val": {"n01440764": 1, "b": 1}})
    _keras_files(tmp)
    _folder(tmp / "no_val", {"train": good})
    _folder(tmp / "empty_class", {"train": {"a": 2, "b": 0}, "val": good})
    _folder(tmp / "val_differs", {"train": good, "val": {"a": 1, "c": 1}})
    (tmp / "all_bad" / "train" / "a").mkdir(parents=True)
    (tmp / "all_bad" / "train" / "a" / "x.JPEG").write_bytes(b"not a jpeg")
    _folder(tmp / "all_bad", {"val": {"a": 1}})
    cases = []
    for _, flags, _, extra in CASES:
        merged = {**GOOD, **flags}
        argv = [f"--{k}={v}".format(tmp=tmp, data=tmp / "good") for k, v in merged.items()]
        # each case its own workdir, unless the case is about the workdir
        argv = [a.replace(f"{tmp}/wd", f"{tmp}/wd_{len(cases)}") for a in argv]
        cases.append({"argv": argv, **extra})
    (tmp / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "VIT_COMPRESS_CACHE": ""}
    proc = subprocess.run([sys.executable, *WORKER, str(tmp / "cases.json"),
                           str(tmp / "results.json")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(zip([c[0] for c in CASES], json.loads((tmp / "results.json").read_text())))


def test_there_are_enough_cases():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name, expected", [(c[0], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(results, name, expected):
    r = results[name]
    err = r["stderr"]
    assert r["code"] not in (0, None), (r["argv"], err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert re.search(expected, last), f"last line: {last!r}\nargv: {r['argv']}"
    # no stage ran, except in STAGES_RAN
    assert "starting" not in r["stdout"] or name in STAGES_RAN, r["stdout"]


def test_a_refused_run_leaves_no_workdir_behind(results):
    """Every case refused before its first stage names a workdir that did not exist: none is
    left behind, including those refused after the workdir was made and locked (the data, the
    teacher's head, the structured keep checked on the built student)."""
    left = []
    for name, r in results.items():
        wd = next(a.split("=", 1)[1] for a in r["argv"] if a.startswith("--workdir="))
        if name not in STAGES_RAN and "/wd_" in wd and pathlib.Path(wd).exists():
            left.append((name, sorted(p.name for p in pathlib.Path(wd).rglob("*"))))
    assert not left, left
    assert any("/wd_" in a for r in results.values() for a in r["argv"])


def test_a_renamed_config_key_is_accepted_with_a_note(results):
    """`qat.temperature` is now `qat.kd_temperature`: the old name reaches the new key (its
    value is checked under the new name, above) after one line naming both."""
    err = results["renamed_key"]["stderr"]
    assert "note: --config.qat.temperature is now --config.qat.kd_temperature" in err


def test_second_run_on_a_locked_workdir_names_the_holder(tmp_path):
    """A live process holding the workdir's lock refuses a second pipeline run; when it ends
    (here: SIGKILL) the lock is released with it."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time;"
         "from experiments.workdir import lock_workdir; lock_workdir(sys.argv[1]);"
         "print('locked', flush=True); time.sleep(120)", str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = subprocess.run(pipeline_command(tmp_path, "/nonexistent"), cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert f"another run (pid {holder.pid}) is using this workdir" in last, last
    finally:
        holder.kill()
        holder.wait()
    from experiments.workdir import lock_workdir

    os.close(lock_workdir(tmp_path))  # released by the kill: taken again (it raises if not)


def test_multi_worker_tasks_share_the_workdir_but_not_their_lock(tmp_path):
    """The chief locks `.lock`, every other task its own file: a chief and its workers run in
    one workdir (before, the second worker of a two-worker launch was refused), a second copy
    of any task is not; a TF_CONFIG that is not JSON is a ValueError."""
    import json

    from experiments.workdir import WorkdirLocked, lock_name, lock_workdir

    def cfg(kind, index, chief=False):
        cluster = {"worker": ["a:1", "b:1"], **({"chief": ["c:1"]} if chief else {})}
        return json.dumps({"cluster": cluster, "task": {"type": kind, "index": index}})

    assert lock_name("default", cfg("worker", 1)) == ".lock"  # TF_CONFIG only matters there
    assert lock_name("multi_worker", cfg("worker", 0)) == ".lock"  # worker 0 is the chief
    assert lock_name("multi_worker", cfg("worker", 1)) == ".lock.worker1"
    assert lock_name("multi_worker", cfg("chief", 0, chief=True)) == ".lock"
    assert lock_name("multi_worker", cfg("worker", 0, chief=True)) == ".lock.worker0"
    with pytest.raises(ValueError, match="TF_CONFIG is not JSON"):
        lock_name("multi_worker", "{cluster")
    held = [lock_workdir(tmp_path, ".lock"), lock_workdir(tmp_path, ".lock.worker1")]
    try:
        for name in (".lock", ".lock.worker1"):
            with pytest.raises(WorkdirLocked):
                lock_workdir(tmp_path, name)
    finally:
        for fd in held:
            os.close(fd)


def test_a_good_teacher_checkpoint_passes_flag_validation(tmp_path):
    """A timm ViT .safetensors is read and accepted; the run then stops at the missing data."""
    import_torch_timm()
    safetensors_torch = require_module("safetensors.torch")
    from timm.models.vision_transformer import VisionTransformer

    tm = VisionTransformer(img_size=32, patch_size=16, embed_dim=192, depth=1, num_heads=3)
    path = tmp_path / "vit.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, path)
    proc = subprocess.run(pipeline_command(tmp_path / "run", "/nonexistent/imagenette",
                                           teacher=path), cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "--teacher" not in proc.stderr
    assert "/nonexistent/imagenette" in last, last
