import pytest

import models
from models import registry

# The names, roles and exact parameter counts of every model are checked in test_all_models.py.


def test_list_models_is_sorted_and_filters_by_glob_and_family():
    names = models.list_models()
    assert names == sorted(names)
    vits = [n for n in names if models.get_model_info(n).family == "vit"]
    assert "vit_tiny_patch16" in vits
    assert models.list_models("vit_*") == models.list_models(family="vit") == vits
    assert models.list_models("no_such_*") == [] == models.list_models(family="no_such")


def test_every_model_family_is_declared_by_its_module():
    """Each family's facts (structured pruning, timm names, QAT specs) sit in its module's
    `FAMILY`, found without a module list; timm names only name models of that family."""
    families = registry.list_families()
    assert {models.get_model_info(n).family for n in models.list_models()} == set(families)
    for name in families:
        family = registry.get_family(name)
        assert family.name == name and family.module.startswith("models.")
        assert all(models.get_model_info(n).family == name for n in family.timm_names)
    prunable = registry.list_families(structured_pruning=True)
    assert "mobilevit" in prunable and "vit" not in prunable
    assert registry.get_family("no_such") == registry.Family("no_such")  # the defaults


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
