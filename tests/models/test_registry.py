import numpy as np
import pytest

import models
from models.compat import keras

STUDENTS = [
    "mobilevit_xxs", "mobilevit_xs", "mobilevit_s",
    "mobile_former_26m", "mobile_former_52m", "mobile_former_96m", "mobile_former_151m",
    "mobile_former_214m", "mobile_former_294m", "mobile_former_508m",
    "efficientformer_l1", "efficientformer_l3", "efficientformer_l7",
]
TEACHERS = ["vit_tiny_patch16", "vit_small_patch16", "vit_base_patch16"]


def trainable_params(model):
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def test_list_models_is_sorted_and_filters_by_glob():
    names = models.list_models()
    assert names == sorted(names)
    assert set(TEACHERS) <= set(names)
    assert models.list_models("vit_*") == sorted(TEACHERS)
    assert models.list_models("no_such_*") == []


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError, match="unknown model 'resnet50'.*vit_tiny_patch16"):
        models.create_model("resnet50")
    with pytest.raises(ValueError, match="known models"):
        models.get_model_info("resnet50")


@pytest.mark.parametrize("size", [100, 0, -16])
def test_bad_input_size_is_refused(size):
    with pytest.raises(ValueError, match="input_size|multiples of 16"):
        models.create_model("vit_tiny_patch16", input_size=size)


def test_model_info_fields():
    info = models.get_model_info("vit_small_patch16")
    assert (info.params, info.default_size, info.size_divisor) == (22_050_664, 224, 16)
    assert info.role == "teacher" and info.family == "vit" and info.fixed_size is False


@pytest.mark.parametrize("name", [n for n in STUDENTS + TEACHERS])
def test_exact_parameter_count(name):
    if name not in models.list_models():
        pytest.skip(f"{name} is not registered yet")
    info = models.get_model_info(name)
    keras.backend.clear_session()
    model = models.create_model(name, input_size=info.default_size)
    assert trainable_params(model) == info.params
    assert info.role == ("teacher" if name in TEACHERS else "student")
