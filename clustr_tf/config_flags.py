"""absl flags generated from `clustr_tf.config`'s fields, and the checked `RunConfig` built back.

    def define_flags():                                   # training/main.py
        config_flags.define_flags(module_name=__name__)

    config = config_flags.config_from_flags(flags.FLAGS)  # after parsing; raises config.ConfigError

One flag per field of the five sections (`Data`, `Model`, `Objective`, `Optimizer`, `Runtime`),
in declaration order, named as the field, with the field's default and its `help` metadata. The
flag's type comes from the annotation without None (`int | None`: an integer flag whose default
is None; `bool`: a --[no]name flag), or from `flag_type` metadata where the annotation has
several (`lr_milestones`, a string flag). A setting with a fixed set of values is a string flag
whose help names them: the config checks the value, so a bad one is a `ConfigError` naming the
flag, not absl's usage error. A field with `flag_scale` metadata (the perturbation sizes, pixel
units in the config) takes its flag in 1/flag_scale units, checked in those units.

Imports no TensorFlow (nor does `clustr_tf.config`): flags are parsed and checked before it loads.
"""

import dataclasses
import sys
import types
import typing

from absl import flags

from clustr_tf import config

_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string}


def sections():
    """[(section name, section class)] of `RunConfig`: ("data", config.Data), ..."""
    return [(field.name, field.default_factory) for field in dataclasses.fields(config.RunConfig)]


def settings():
    """Every setting's `dataclasses.Field`, section by section in declaration order."""
    return [field for _, kind in sections() for field in dataclasses.fields(kind)]


def flag_type(field):
    """The Python type of `field`'s flag: bool, int, float or str."""
    kind = field.metadata.get("flag_type", field.type)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kinds = [k for k in typing.get_args(kind) if k is not type(None)]
        kind = kinds[0] if len(kinds) == 1 else kind
    if kind not in _DEFINE:
        raise TypeError(f"Setting `{field.name}` of type {kind} needs `flag_type` metadata: one of bool, int, float, "
                        f"str. Received: {field.type}")
    return kind


def flag_default(field):
    """The flag's default: the field's, in the flag's units."""
    scale = field.metadata.get("flag_scale")
    return field.default if scale is None or field.default is None else field.default * scale


def define_flags(flag_values=flags.FLAGS, module_name=None):
    """Defines one flag per setting on `flag_values`.

    Args:
        flag_values: the `absl.flags.FlagValues` to define them on (default: the global FLAGS).
        module_name: the module the flags belong to, whose `--help` lists them; default: the
            calling module (as absl's DEFINE functions: the main module's name is `sys.argv[0]`).

    Returns:
        The flags' names, in definition order.
    """
    module_name = module_name or sys._getframe(1).f_globals["__name__"]
    module_name = sys.argv[0] if module_name == "__main__" else module_name
    for field in settings():
        _DEFINE[flag_type(field)](field.name, flag_default(field), field.metadata["help"], flag_values=flag_values,
                                  module_name=module_name)
    return [field.name for field in settings()]


def _check_flag_units(values):
    """Checks the flags in 1/flag_scale units as typed (before they are converted to pixels)."""
    if not 0 < values["pgd_step"] <= values["pgd_eps"]:
        raise config.ConfigError(f"`pgd_eps`, `pgd_step` must satisfy 0 < step <= eps <= 255 (1/255 units). "
                                 f"Received: {values['pgd_eps']}, {values['pgd_step']}")
    for field in settings():
        scale = field.metadata.get("flag_scale")
        if scale is not None and not 0 <= values[field.name] <= scale:
            raise config.ConfigError(f"`{field.name}` must be in [0, {scale:g}] (1/{scale:g} units). "
                                     f"Received: {values[field.name]}")


def config_from_values(values):
    """The checked `config.RunConfig` of flag values.

    Args:
        values: dict, flag name -> value in the flag's units; a missing flag takes its default.

    Returns:
        A `config.RunConfig`.

    Raises:
        config.ConfigError: a value that cannot work (`as_flags()` names its flag).
    """
    defaults = {field.name: flag_default(field) for field in settings()}
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise config.ConfigError(f"Unknown setting `{unknown[0]}`. Received: {values[unknown[0]]!r}")
    values = {**defaults, **values}
    _check_flag_units(values)
    built = {}
    for name, kind in sections():
        kwargs = {}
        for field in dataclasses.fields(kind):
            value, scale = values[field.name], field.metadata.get("flag_scale")
            kwargs[field.name] = value / scale if scale is not None and value is not None else value
        built[name] = kind(**kwargs)
    return config.RunConfig(**built)


def config_from_flags(flag_values=flags.FLAGS):
    """The checked `config.RunConfig` of parsed flags (`define_flags`'s); raises `config.ConfigError`."""
    return config_from_values({field.name: flag_values[field.name].value for field in settings()})
