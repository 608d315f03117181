"""The prune stage's two methods through the later stages, beyond the smoke run (which cuts
MobileViT-XXS with structured pruning, as quick does: test_pipeline_smoke.py). Slow tier:

- structured pruning of Mobile-Former-52M (its Formers' heads cut by index; the costliest graph
  to convert: about five minutes on two idle cores);
- magnitude pruning of MobileViT-XXS carried through prune-preserving QAT and the sparse export
  formats.

Each starts from the smoke preset's teacher, with 2 steps per training stage (magnitude: the
smoke preset's 6 prune steps, which reach its 50% sparsity)."""

import json

import pytest

import models
from compress.measure.costs import static_costs
from compress.tflite.audit import audit_tflite
from tests.helpers import run_pipeline

KEEP = 0.8
HEADS = 4  # attention heads of every transformer block
TWO_STEPS = ["--config.distill.baseline=false", "--config.distill.steps=2",
             "--config.distill.warmup_steps=1", "--config.qat.steps=2"]


@pytest.mark.slow
def test_structured_cut_of_mobile_former_rebuilds_and_later_stages_use_it(smoke_teacher):
    workdir, data = smoke_teacher
    student = "mobile_former_52m"
    run_pipeline(workdir, data, "--stages=distill,prune,qat,export", *TWO_STEPS,
                 "--config.prune.steps=2", "--config.prune.method=structured", f"--config.prune.keep={KEEP}",
                 "--config.export.formats.distill=('fp32', 'int8')",
                 "--config.export.formats.prune=('fp32', 'int8')", student=student)

    spec = json.loads((workdir / "prune" / "model.json").read_text())
    widths = spec["overrides"]["widths"]
    assert set(widths) == {"expand", "mlp", "heads"}
    for h in widths["heads"]:  # the kept heads' indices
        assert h and set(h) <= set(range(HEADS))
    cut = models.create_model(spec["name"], num_classes=spec["num_classes"],
                              input_size=64, **spec["overrides"])
    cut.load_weights(str(workdir / "prune" / "weights.h5"))  # rebuilt from model.json alone
    dense = models.create_model(student, num_classes=spec["num_classes"], input_size=64)
    kept = static_costs(cut, 64)["macs"] / static_costs(dense, 64)["macs"]
    summary = json.loads((workdir / "prune" / "structured.json").read_text())
    assert abs(summary["kept_fraction"] - kept) < 1e-9 and KEEP - 0.1 < kept <= KEEP
    assert cut.count_params() < dense.count_params()

    export = workdir / "export"
    size = {p.name.split(".", 1)[1]: p.stat().st_size for p in export.glob("*.tflite")}
    assert size["prune.fp32.tflite"] < size["distill.fp32.tflite"]
    assert size["prune.int8.tflite"] < size["distill.int8.tflite"]
    assert "qat.int8.tflite" in size  # QAT trained from the cut model and exported
    dense_audit = audit_tflite(str(export / f"{student}.distill.int8.tflite"))
    for name in ("prune.int8", "qat.int8"):
        audit = audit_tflite(str(export / f"{student}.{name}.tflite"))
        assert audit["partitions"] == 1 and audit["undelegated_ops"] == {}, name
        extra = {op: n for op, n in audit["float_heavy_by_op"].items()
                 if n > dense_audit["float_heavy_by_op"].get(op, 0)}
        assert extra == {}, (name, extra)


@pytest.mark.slow
def test_magnitude_pruning_is_kept_by_qat_and_stored_sparse(smoke_teacher):
    workdir, data = smoke_teacher
    run_pipeline(workdir, data, "--stages=distill,prune,qat,export", *TWO_STEPS,
                 "--config.prune.method=magnitude", "--config.export.formats.distill=('fp32',)")
    assert 0.45 <= json.loads((workdir / "prune" / "metrics.json").read_text())["sparsity"] <= 0.55
    assert json.loads((workdir / "qat" / "model.json").read_text())["wrappers"] == ["prune", "qat"]
    export = workdir / "export"
    size = {p.name.split(".", 1)[1]: p.stat().st_size for p in export.glob("*.tflite")}
    assert {"prune.fp32.tflite", "prune.int8.tflite", "prune.fp32_sparse.tflite",
            "prune.int8_sparse.tflite", "qat.int8.tflite"} <= set(size)
    assert size["prune.fp32_sparse.tflite"] < size["prune.fp32.tflite"]
