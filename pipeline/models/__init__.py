"""The architectures of the studies, their checkpoints and their complexity.

``registry``    the table architectures register into, with each one's default config
``catalog``     lookups in the complete registry: names, default configs, validation, ``describe_init``
``build``       ``build_model`` (registered builder -> initial weights -> freezing policy)
``classifier``  ``ImageClassifier``: normalize -> backbone -> head; the Grad-CAM target layer
``heads``       the classification heads (``model.head.kind``)
``backbones``   architectures on timm/pytorchcv backbones (Mini-COVIDNet, POCOVID-Net, ...)
``capsules``    COVID-CAPS and its scaled variant
``freeze``      freezing policies (``model.freeze``)
``checkpoint``  the checkpoint format; ``complexity``: parameters, FLOPs, size
"""
