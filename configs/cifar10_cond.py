"""Class-conditional CIFAR-10 with classifier-free guidance (Ho & Salimans 2022): the paper's
CIFAR-10 model plus a class embedding with a null class; labels are dropped to the null class
with probability 0.1 during training, and sampling mixes conditional and unconditional outputs
with the guidance weight w."""

from configs.base import get_base_config


def get_config():
    config = get_base_config()
    config.model.num_classes = 10
    config.training.label_dropout = 0.1
    config.sampling.guidance_scale = 0.3
    return config
