"""Presets of the pipeline: `smoke` (CI, minutes on a 2-core CPU), `quick` (real Imagenette
figures on a 2-core CPU in about two hours), `full` (the papers' recipes, for a GPU machine).

Every value can be overridden on the command line as `--config.<section>.<key>=value`
(ml_collections: types are checked and unknown keys are refused). Step counts are optimizer
steps; `None` sizes mean "the student's default size".
"""

from __future__ import annotations

import ml_collections

PRESETS = ("smoke", "quick", "full")


def _sampler(min_size, max_size, n_scales, base_size, base_batch, multiscale=True):
    return dict(multiscale=multiscale, min_size=min_size, max_size=max_size, n_scales=n_scales,
                base_size=base_size, base_batch=base_batch)


def _optim(steps, lr, weight_decay, warmup_steps, min_lr_ratio=0.01, label_smoothing=0.1):
    return dict(steps=steps, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                min_lr_ratio=min_lr_ratio, label_smoothing=label_smoothing)


def _kd(kind="soft", alpha=0.5, temperature=2.0):
    """The teacher's part in a prune or QAT stage (compress.distill.KINDS; `kd_alpha` weighs it)."""
    return dict(kind=kind, kd_alpha=alpha, temperature=temperature)


def get_config(preset: str = "smoke") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"--preset: unknown preset {preset!r}; accepted: {', '.join(PRESETS)}")
    smoke, quick = preset == "smoke", preset == "quick"
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.seed = 0
    # teacher and distill stages only (pruning, QAT and export run in float32)
    # compress.training.PRECISIONS; 'auto': bfloat16 on TPUs and BF16 CPUs, float16 on GPUs
    c.mixed_precision = "float32" if smoke else "mixed_bfloat16"
    # XLA for every training step (static shapes help it: see README "Scale-out"); slower here
    c.jit_compile = False

    c.data = dict(
        # Small real subset for smoke; 0 = everything.
        train_per_class=12 if smoke else 0,
        val_per_class=5 if smoke else 0,
        crop_pct=0.875,
        scale_min=0.25 if smoke else 0.08,  # random-resized-crop lower area bound
        randaugment=not smoke and not quick,
        mixup=0.0,
        cutmix=0.0,
    )
    # The student's multi-scale sampler; the prune and QAT stages start from the same one (each
    # section owns a copy: `--config.qat.sampler.multiscale=false` changes QAT alone).
    sampler = _sampler(*((64, 96, 2, 64, 16) if smoke else
                         ((128, 256, 5, 192, 48) if quick else (160, 320, 5, 256, 128))))
    c.teacher = dict(
        input_size=64 if smoke else (128 if quick else 224),
        batch_size=16 if smoke else (64 if quick else 256),
        checkpoint_every=10 if smoke else 200,
        eval_every=0,  # 0: evaluate at the end only
        **_optim(steps=8 if smoke else (1200 if quick else 100_000), lr=1e-3,
                 weight_decay=0.05, warmup_steps=2 if smoke else (150 if quick else 5000)),
    )
    c.distill = dict(
        kind="soft",  # compress.distill.KINDS: soft | hard | none
        alpha=0.5,
        temperature=2.0,
        # Also train a labels-only student at the same budget, for comparison. Off in `quick`: it
        # doubles the distill stage (~45 min on 2 cores) and the preset must fit two hours.
        baseline=False,
        checkpoint_every=10 if smoke else 200,
        eval_every=0,
        sampler=sampler,
        **_optim(steps=8 if smoke else (1200 if quick else 300_000), lr=2e-3,
                 weight_decay=0.01 if not smoke else 0.0,
                 warmup_steps=2 if smoke else (150 if quick else 20_000)),
    )
    c.prune = dict(
        target_sparsity=0.5,
        schedule="polynomial",  # polynomial | constant
        m_by_n="",  # "" or "2:4"
        skip=("*_dw*", "head*", "stem*"),  # layer-name globs that stay dense
        begin_frac=0.0,
        end_frac=0.7,
        frequency=2 if smoke else 50,
        **_kd(),
        checkpoint_every=10 if smoke else 200,
        **_optim(steps=6 if smoke else (400 if quick else 30_000), lr=5e-4,
                 weight_decay=0.0, warmup_steps=0, label_smoothing=0.1),
    )
    c.qat = dict(
        preserve_sparsity=True,
        **_kd(),
        checkpoint_every=10 if smoke else 200,
        # quick: 300 steps left the QAT int8 file 1.1 points under the distilled fp32 one on
        # Imagenette, 600 steps 0.2 (README); ~8 more minutes on 2 cores
        **_optim(steps=4 if smoke else (600 if quick else 10_000), lr=1e-4,
                 weight_decay=0.0, warmup_steps=0, label_smoothing=0.1),
    )
    for stage in (c.prune, c.qat):
        stage.sampler = dict(sampler)
    c.export = dict(
        size=64 if smoke else 0,  # 0: the student's default size
        representative_images=8 if smoke else 200,
        xnnpack_friendly=True,
        float_layers=(),  # layer-name globs kept float in the fast int8 files (e.g. "block1_*")
        formats=dict(distill=("fp32", "fp16", "drq", "int8"),
                     prune=("fp32", "int8", "fp32_sparse", "int8_sparse"),
                     qat=("int8",)),
    )
    c.benchmark = dict(
        threads=(1,) if smoke else (1, 0),  # 0: all cores
        delegates=("xnnpack",) if smoke else ("xnnpack", "none"),
        warmup=3 if smoke else 10,
        runs=10 if smoke else 100,
        val_limit=50 if smoke else 0,  # images scored per file; 0 = the whole val split
        # Refuse AMX to XNNPACK when timing (Intel AMX CPUs only; compress/benchmark.py): its
        # AMX int8 kernels are slower than AVX512-VNNI on small mobile layers.
        deny_amx=False,
    )
    c.eval_batch_size = 32 if smoke else 64
    return c
