"""DDPM CIFAR-10, exactly the paper's run (Ho et al. 2020, Appendix B): the base config."""

from configs.base import get_base_config


def get_config():
    return get_base_config()
