"""Normalization constants of the small datasets, which both the data package (its transforms) and
the models (their timm ``pretrained_cfg``) state; ImageNet's are timm's
(``timm.data.IMAGENET_DEFAULT_MEAN``)."""

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
