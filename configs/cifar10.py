"""DDPM CIFAR-10, exactly the paper's run (REFERENCE.md §4): the base config."""

from configs.base import get_base_config


def get_config():
    return get_base_config()
