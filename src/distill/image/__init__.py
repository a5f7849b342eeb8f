"""The image-classifier kind (``distill-cifar``): data (image folders, tarballs, CIFAR-10 -> uint8 cache), models
(CIFAR ResNets), losses (Hinton KD), the training loop, evaluation and the stage functions. Submodules are
imported explicitly; :mod:`distill.image.kind` is this kind's entry in :mod:`distill.kinds`."""
