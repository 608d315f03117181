"""Every numeric value of every preset has a range check (configs.check), the presets pass their
own checks, and the preset is read from a command line before its flags are parsed."""

import pytest

from experiments import configs


def _numeric_keys(c, prefix=""):
    for key, value in c.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items"):
            yield from _numeric_keys(value, name + ".")
        elif isinstance(value, (tuple, list)):
            yield from (f"{name}[{i}]" for i, v in enumerate(value)
                        if isinstance(v, (int, float)) and not isinstance(v, bool))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield name


@pytest.mark.parametrize("preset", configs.PRESETS)
def test_every_numeric_key_has_a_range_check(preset):
    c = configs.get_config(preset)
    numeric = set(_numeric_keys(c))
    assert len(numeric) > 50
    missing = numeric - configs.checked_keys(c)
    assert not missing, f"numeric config keys without a check in configs._rules: {sorted(missing)}"
    assert configs.check(c) == []


def test_check_names_key_value_and_accepted_range():
    c = configs.get_config("smoke")
    c.teacher.batch_size, c.prune.lr, c.qat.sampler.n_scales = 0, float("nan"), 0
    c.qat.warmup_steps = 9  # bounded by qat.steps (4)
    assert configs.check(c) == [
        "--config.teacher.batch_size: 0 is not accepted; accepted: an integer >= 1",
        "--config.prune.lr: nan is not accepted; accepted: a number > 0",
        "--config.qat.warmup_steps: 9 is not accepted; accepted: an integer in [0, steps=4]",
        "--config.qat.sampler.n_scales: 0 is not accepted; accepted: an integer >= 1"]


def test_the_preset_is_read_from_the_command_line_before_flag_parsing():
    preset_from_argv = configs.preset_from_argv
    assert preset_from_argv(["prog", "--preset=quick", "--config.seed=1"]) == "quick"
    assert preset_from_argv(["prog", "--preset", "full"]) == "full"
    assert preset_from_argv(["prog"]) == "smoke"
    assert preset_from_argv(["prog"], "quick") == "quick"
    # a value that is no preset: the default config, and the --preset flag names the error
    assert preset_from_argv(["prog", "--preset=medium"], "quick") == "quick"
