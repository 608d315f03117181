"""Presets of the pipeline: `smoke` (CI, minutes on a 2-core CPU), `quick` (real Imagenette
figures on a 2-core CPU: about 1.5 hours on a Zen 5 VM, 2.3 on a Xeon with AMX, about 3 on an
AVX2-only one), `full` (the papers' recipes, for a GPU machine).

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
    """The teacher's part in a prune or QAT stage: `kd_kind` (compress.distill.KINDS),
    `kd_alpha` (its weight against the labels) and `kd_temperature`, the distill section's
    `kind`, `alpha` and `temperature` for that stage (`prune.method` is the pruning kind)."""
    return dict(kd_kind=kind, kd_alpha=alpha, kd_temperature=temperature)


def preset_from_argv(argv: list[str], default: str = "smoke") -> str:
    """The --preset value of a command line, read before flag parsing: it picks the config that
    the --config.* overrides apply to (config_flags builds those override flags from the default
    config). A value that is no preset gives `default`, and the --preset flag itself refuses it."""
    preset = default
    for i, a in enumerate(argv):
        if a.startswith("--preset="):
            preset = a.split("=", 1)[1]
        elif a == "--preset" and i + 1 < len(argv):
            preset = argv[i + 1]
    return preset if preset in PRESETS else default


# Keys that were renamed, still accepted on the command line with a one-line note
# (experiments.pipeline): old -> new.
RENAMED = {f"{s}.{old}": f"{s}.kd_{old}" for s in ("prune", "qat")
           for old in ("kind", "temperature")}


def get_config(preset: str = "smoke") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"--preset: unknown preset {preset!r}; accepted: {', '.join(PRESETS)}")
    smoke, quick = preset == "smoke", preset == "quick"
    c = ml_collections.ConfigDict()
    c.preset = preset
    # Seeds weight initialisation, dropout, augmentation and the sampler (compress.training.seed).
    c.seed = 0
    # Deterministic TF ops (tf.config.experimental.enable_op_determinism): the same seed gives
    # the same figures; false turns it off (its cost: docs/pipeline.md).
    c.deterministic = True
    # teacher and distill stages only (pruning, QAT and export run in float32)
    # compress.training.PRECISIONS; 'auto': bfloat16 on TPUs and BF16 CPUs, float16 on GPUs
    c.mixed_precision = "float32" if smoke else "auto"
    # XLA for every training step (static shapes help it: docs/scale_out.md); slower on CPUs
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
        # The size the teacher sees images at: trained at (a registry model from labels), or
        # evaluated and cached at (a pretrained one); 0: its own size. quick: EfficientNet-Lite2
        # with its ImageNet head sliced scores 95.8% / 98.0% / 98.8% at 128 / 160 / 192 px on 600
        # Imagenette val images; 160 costs 0.69x the work of 192 per cached view.
        input_size=64 if smoke else (160 if quick else 224),
        batch_size=16 if smoke else (64 if quick else 256),
        checkpoint_every=10 if smoke else 200,
        eval_every=0,  # 0: evaluate at the end only (else every that many steps)
        **_optim(steps=8 if smoke else (1200 if quick else 100_000), lr=1e-3,
                 weight_decay=0.05, warmup_steps=2 if smoke else (150 if quick else 5000)),
    )
    c.distill = dict(
        kind="soft",  # compress.distill.KINDS: soft | hard | none
        # quick: the teacher's soft labels alone at T=1, no label term (function matching,
        # Beyer et al. 2022: a strong teacher and consistent views); T=4 scored 7.5 points
        # below T=1 in a paired run of 600 steps (docs/results/2026-12-07-gain-over-seeds.md);
        # alpha not yet compared. smoke keeps both terms so both are exercised.
        alpha=1.0 if quick else 0.5,
        temperature=1.0 if quick else 2.0,
        # Also train a labels-only student at the same steps, data and seed: report.md opens
        # with the distillation gain over it (paired, on the same validation images). On in
        # smoke and quick (the teacher cache pays for about a fifth of it there,
        # docs/results/2026-12-02-teacher-cache.md); off in
        # full (a second full-length run).
        baseline=smoke or quick,
        # The teacher's outputs computed once (experiments/data/teacher_cache.py): `views`
        # augmented views of every training image with the teacher's `top_k` logits, stored in
        # distill/teacher_cache/ and reused by prune and QAT; 0 = run the teacher on every
        # batch. Off in full: its RandAugment cannot be cached consistently.
        teacher_cache=dict(views=2 if smoke else (4 if quick else 0), top_k=10,
                           images_per_shard=1024, batch_size=128),
        checkpoint_every=10 if smoke else 200,
        eval_every=0,
        sampler=sampler,
        # quick: 1,200 steps for each of the two students (labels-only and distilled): 2 x 19 min
        # on a 2-core Zen 5 VM (0.93 s/step, bfloat16), 2 x 40 min on a 2-core Xeon with AMX
        # (1.8-2.0 s/step, bfloat16), 2 x 50 min on a 2-core AVX2-only one (2.2-2.5 s/step,
        # float32; docs/results/2026-12-07-quick-pretrained-teacher*.md)
        **_optim(steps=8 if smoke else (1200 if quick else 300_000), lr=2e-3,
                 weight_decay=0.01 if not smoke else 0.0,
                 warmup_steps=2 if smoke else (120 if quick else 20_000)),
    )
    c.prune = dict(
        # magnitude: zeros in the weights (tfmot); structured: whole heads, MLP units and
        # expansion channels removed, a smaller dense model (compress/structured.py)
        # smoke and quick: structured, the method that makes files faster (magnitude zeros do
        # not on XNNPACK); full: magnitude
        method="magnitude" if preset == "full" else "structured",
        keep=0.7,  # structured: fraction of the distilled student's MACs kept (export size)
        importance="taylor",  # structured: taylor | magnitude (compress/structured.py)
        min_width=0.25,  # structured: fraction of every block's units that stays
        score_batches=2 if smoke else 16,  # structured: batches of the taylor importance
        # structured: a latency budget instead of `keep`: the largest keep whose int8 file runs
        # in target_ms on this host's XNNPACK at target_threads (0: use `keep`)
        target_ms=0.0,
        target_threads=1,
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
        # Imagenette, 600 steps 0.2 (docs/results/2026-11-25-quick-mobilevit-xxs.md); ~8 more
        # minutes on 2 cores
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
        # smoke and quick: one thread on XNNPACK, the phone-like figure; full adds all cores and
        # the builtin kernels
        threads=(1,) if smoke or quick else (1, 0),  # 0: all cores
        delegates=("xnnpack",) if smoke or quick else ("xnnpack", "none"),
        warmup=3 if smoke else 10,
        runs=10 if smoke else 100,
        val_limit=50 if smoke else 0,  # images scored per file; 0 = the whole val split
        # Refuse AMX to XNNPACK when timing (Intel AMX CPUs only; compress/measure/latency.py): its
        # AMX int8 kernels are slower than AVX512-VNNI on small mobile layers.
        deny_amx=False,
    )
    c.eval_batch_size = 32 if smoke else 64
    return c


# --------------------------------------------------------------------------------------------
# Ranges of every numeric value, checked at flag-parsing time (experiments.pipeline), before any
# stage runs: one line per problem, naming the key, the value and what is accepted.


def _int(lo=None, hi=None, *, hi_name=None):
    """An integer in [lo, hi] (`hi_name`: the key `hi` comes from, for the message)."""
    def ok(v):
        return isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo) and (
            hi is None or v <= hi)

    if hi is None:
        return ok, "an integer" + (f" >= {lo}" if lo is not None else "")
    return ok, f"an integer in [{lo}, {f'{hi_name}={hi}' if hi_name else hi}]"


def _real(lo, hi, *, lo_open=False, hi_open=False, lo_name=None):
    """A number between lo and hi (None: unbounded), the ends open or closed."""
    def ok(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:  # NaN
            return False
        return (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))

    low = f"{lo_name}={lo}" if lo_name else lo
    if hi is None:
        return ok, f"a number {'>' if lo_open else '>='} {low}"
    return ok, f"a number in {'(' if lo_open else '['}{low}, {hi}{')' if hi_open else ']'}"


def _multiple(divisor, *, zero_ok=False, zero_means="the student's default size"):
    def ok(v):
        return (isinstance(v, int) and not isinstance(v, bool)
                and ((zero_ok and v == 0) or (v > 0 and v % divisor == 0)))

    return ok, (f"0 ({zero_means}) or " if zero_ok else "") + \
        f"a positive multiple of {divisor}"


def _rules(c, size_divisor: int, teacher_divisor: int):
    """(key, ok(value), accepted) for every numeric value of config `c`; bounds that depend on
    another key (warmup_steps <= steps, begin_frac < end_frac, the sampler's size order) name
    it in the accepted text."""
    rules = [("seed", *_int(0)), ("eval_batch_size", *_int(1)),
             ("data.train_per_class", *_int(0)), ("data.val_per_class", *_int(0)),
             ("data.crop_pct", *_real(0, 1, lo_open=True)),
             ("data.scale_min", *_real(0, 1, lo_open=True)),
             ("data.mixup", *_real(0, None)), ("data.cutmix", *_real(0, None)),
             ("teacher.input_size", *_multiple(teacher_divisor, zero_ok=True,
                                                zero_means="the teacher's own size")),
             ("teacher.batch_size", *_int(1)),
             ("distill.alpha", *_real(0, 1)), ("distill.temperature", *_real(0, None, lo_open=True)),
             ("prune.target_sparsity", *_real(0, 1, hi_open=True)),
             ("prune.begin_frac", *_real(0, 1, hi_open=True)),
             ("prune.end_frac", *_real(c.prune.begin_frac, 1, lo_open=True, lo_name="begin_frac")),
             ("prune.frequency", *_int(1)),
             ("distill.teacher_cache.views", *_int(0)),
             ("distill.teacher_cache.top_k", *_int(1)),
             ("distill.teacher_cache.images_per_shard", *_int(1)),
             ("distill.teacher_cache.batch_size", *_int(1)),
             ("prune.keep", *_real(0, 1, lo_open=True)),
             ("prune.min_width", *_real(0, 1, lo_open=True)),
             ("prune.score_batches", *_int(1)), ("prune.target_ms", *_real(0, None)),
             ("prune.target_threads", *_int(1)),
             ("export.size", *_multiple(size_divisor, zero_ok=True)),
             ("export.representative_images", *_int(1)),
             ("benchmark.warmup", *_int(0)), ("benchmark.runs", *_int(1)),
             ("benchmark.val_limit", *_int(0))]
    rules += [(f"benchmark.threads[{i}]", *_int(0)) for i in range(len(c.benchmark.threads))]
    for name in ("teacher", "distill", "prune", "qat"):
        s = c[name]
        rules += [(f"{name}.steps", *_int(1)), (f"{name}.lr", *_real(0, None, lo_open=True)),
                  (f"{name}.weight_decay", *_real(0, None)),
                  (f"{name}.warmup_steps", *_int(0, s.steps, hi_name="steps")),
                  (f"{name}.min_lr_ratio", *_real(0, 1)),
                  (f"{name}.label_smoothing", *_real(0, 1, hi_open=True)),
                  (f"{name}.checkpoint_every", *_int(1))]
        if "eval_every" in s:
            rules.append((f"{name}.eval_every", *_int(0)))
        if name in ("prune", "qat"):
            rules += [(f"{name}.kd_alpha", *_real(0, 1)),
                      (f"{name}.kd_temperature", *_real(0, None, lo_open=True))]
        if "sampler" in s:
            sm, (multiple, text) = s.sampler, _multiple(size_divisor)
            order = (f"{text}, with min_size <= base_size <= max_size (now {sm.min_size}, "
                     f"{sm.base_size}, {sm.max_size})")
            rules += [(f"{name}.sampler.base_size", multiple, text),
                      (f"{name}.sampler.min_size",
                       lambda v, sm=sm, m=multiple: m(v) and v <= sm.base_size, order),
                      (f"{name}.sampler.max_size",
                       lambda v, sm=sm, m=multiple: m(v) and v >= sm.base_size, order),
                      (f"{name}.sampler.n_scales", *_int(1)),
                      (f"{name}.sampler.base_batch", *_int(1))]
    return rules


def _value(c, key):
    for part in key.replace("[", ".[").split("."):
        c = c[int(part[1:-1])] if part.startswith("[") else c[part]
    return c


def check(c, *, size_divisor: int = 32, teacher_divisor: int = 16) -> list[str]:
    """Problems of config `c`, one line each: `--config.KEY: VALUE is not accepted; accepted: ...`.

    `size_divisor`: the student's (every trained and exported size must be a multiple of it);
    `teacher_divisor`: the teacher's patch size.
    """
    problems = []
    for key, ok, accepted in _rules(c, size_divisor, teacher_divisor):
        value = _value(c, key)
        if not ok(value):
            problems.append(f"--config.{key}: {value!r} is not accepted; accepted: {accepted}")
    return problems


def checked_keys(c) -> set[str]:
    """The keys `check` covers (a test compares them with every numeric key of the config)."""
    return {key for key, *_ in _rules(c, 32, 16)}
