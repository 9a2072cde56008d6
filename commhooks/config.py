"""Hyper-parameters of every algorithm: the config classes, their fields' documentation, the
choice sets. Each config validates itself at construction (``ValueError`` naming the argument);
every field carries its help text, which the recipes' ``--help`` and ``docs/`` are generated from
(:func:`hparam_docs`). The classes live beside what they configure (``commhooks.components``,
``commhooks.ops.schedules``) and the built-in algorithms' classes in ``commhooks.algorithms``;
this module gathers them under one import.
"""

from .algorithms import (
    ALGORITHMS,
    ADPSGDConfig,
    CPSGDConfig,
    DiLoCoConfig,
    DPSGDConfig,
    EASGDConfig,
    EntropySGDConfig,
    ParleConfig,
    SlowMoConfig,
    SSGDConfig,
    SSGDNoiseConfig,
)
from .base.config import BUFFER_POLICIES, GRAD_COMPRESSIONS, CommonConfig, ConfigBase, HParamDoc, hparam
from .components.gossip import TOPOLOGIES
from .registry import config_class, describe, hparam_docs, make_config

__all__ = [
    "ADPSGDConfig", "ALGORITHMS", "BUFFER_POLICIES", "CPSGDConfig", "CommonConfig", "ConfigBase", "DiLoCoConfig", "DPSGDConfig",
    "EASGDConfig", "EntropySGDConfig", "GRAD_COMPRESSIONS", "HParamDoc", "ParleConfig", "SlowMoConfig", "SSGDConfig", "SSGDNoiseConfig",
    "TOPOLOGIES", "config_class", "describe", "hparam", "hparam_docs", "make_config",
]
