"""The architectures of the studies, their checkpoints and their complexity.

``registry``    architecture names, each one's default config, config validation, ``describe_init``
``build``       ``build_model`` (registered builder -> initial weights -> freezing policy)
``classifier``  ``ImageClassifier``: normalize -> backbone -> head; the Grad-CAM target layer
``heads``       the classification heads (``model.head.kind``)
``backbones``   architectures on timm/pytorchcv backbones (Mini-COVIDNet, POCOVID-Net, ...)
``capsules``    COVID-CAPS and its scaled variant
``freeze``      freezing policies (``model.freeze``)
``checkpoint``  the checkpoint format; ``complexity``: parameters, FLOPs, size
"""

# The architecture modules fill the registry when imported (timm-style), so the registry is
# complete whenever any module of this package is used.
from pipeline.models import backbones, capsules  # noqa: F401
