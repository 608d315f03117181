import pytest

import models

# The names, roles and exact parameter counts of every model are checked in test_all_models.py.
VIT = ["vit_base_patch16", "vit_small_patch16", "vit_tiny_patch16"]


def test_list_models_is_sorted_and_filters_by_glob():
    names = models.list_models()
    assert names == sorted(names)
    assert set(VIT) <= set(names)
    assert models.list_models("vit_*") == VIT
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


def test_input_size_rule_fixed_size_models_ignore_requests():
    # the one rule the pipeline's stages and its up-front MAC check share
    flexible = models.get_model_info("mobilevit_xxs")
    assert flexible.input_size(None, 0) == flexible.default_size == 256
    assert flexible.input_size(None, 192) == 192  # config only
    assert flexible.input_size(160, 192) == 160  # the flag wins over the config
    fixed = models.get_model_info("efficientformer_l1")
    assert fixed.fixed_size and fixed.input_size(160, 192) == fixed.default_size == 224
