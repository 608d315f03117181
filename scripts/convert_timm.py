"""Convert a timm checkpoint of a student or a ViT teacher into our Keras weights (`.h5`).

    python scripts/convert_timm.py --model=mobilevit_xxs --checkpoint=mobilevit_xxs.pth \
        --output=mobilevit_xxs.weights.h5
    python scripts/convert_timm.py --model=efficientformer_l1 --timm_pretrained --output=l1.h5
    python scripts/convert_timm.py --model=vit_base_patch16 \
        --checkpoint=vit_base_patch16_224.augreg_in21k_ft_in1k.safetensors --output=vit_b.h5

A ViT checkpoint must have the named model's architecture (checked); its position embedding
is resampled to the 224-px grid the registered ViTs store (e.g. from a 384-px fine-tune).

`--checkpoint` takes a state dict saved by torch (`.pth`, `.pt`, `.bin`) or `.safetensors`;
`--timm_pretrained` lets timm download its pretrained weights (needs internet and timm). The
output loads with `models.create_model(name, num_classes=N).load_weights(path)`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "registry name of a student or ViT teacher "
                    "(see models/timm_convert.py)")
flags.DEFINE_string("checkpoint", None, "timm state dict file (.pth/.pt/.bin/.safetensors)")
flags.DEFINE_bool("timm_pretrained", False, "download timm's pretrained weights instead")
flags.DEFINE_string("output", None, "path of the Keras weights file to write (.h5)")
flags.mark_flags_as_required(["model", "output"])


def main(argv):
    del argv
    from models import registry, timm_convert

    if bool(FLAGS.checkpoint) == FLAGS.timm_pretrained:
        raise app.UsageError("give exactly one of --checkpoint or --timm_pretrained")
    if not FLAGS.output.endswith(".h5"):
        raise app.UsageError(f"--output must end in .h5, got {FLAGS.output!r}")
    source = f"--checkpoint={FLAGS.checkpoint}" if FLAGS.checkpoint else "--timm_pretrained"
    try:
        if FLAGS.checkpoint:
            state_dict = timm_convert.read_state_dict(FLAGS.checkpoint)
        else:
            sys.modules.setdefault("triton", None)  # triton segfaults beside TensorFlow
            import timm

            tm = timm.create_model(registry.timm_names().get(FLAGS.model, FLAGS.model),
                                   pretrained=True)
            state_dict = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
        model = timm_convert.convert(FLAGS.model, state_dict)
    except ValueError as e:  # one line naming the file (or the flag) and what was expected
        sys.exit(f"FATAL: {source}: {e}")
    tmp = FLAGS.output + ".tmp.h5"
    model.save_weights(tmp)
    os.replace(tmp, FLAGS.output)  # atomic: no half-written weights file
    print(f"wrote {FLAGS.output}: {FLAGS.model}, {model.output_shape[-1]} classes, "
          f"{model.count_params():,} weights")


if __name__ == "__main__":
    app.run(main)
