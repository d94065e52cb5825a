"""Freezing policies (``model.freeze``): which parameters train.

``all`` trains everything; ``last_n`` the last ``n`` backbone blocks (``model.blocks``) and the
head; ``named`` the parameters under the listed layers and the head; ``head_only`` the head.
Frozen BatchNorm layers also stay in eval mode (:meth:`ImageClassifier.train`).
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.models.classifier import ImageClassifier
from pipeline.models.registry import FREEZE_POLICIES, check_choice, few_names


def apply_freeze(model: ImageClassifier, policy: str = "all", *, n: int = 0,
                 layers: Sequence[str] = ()) -> None:
    """Set ``requires_grad`` of every parameter according to a freeze policy.

    Args:
        model: A model from :func:`pipeline.models.build.build_model`.
        policy: ``all`` (everything trains), ``last_n`` (the last ``n`` of ``model.blocks`` +
            head), ``named`` (parameters under one of ``layers`` + head) or ``head_only``.
        n: Number of trailing backbone blocks for ``last_n``.
        layers: Parameter-name prefixes for ``named``, matched at dots (``backbone.28`` is
            ``backbone.28.*``, not ``backbone.280``); a leading ``backbone.`` may be left out.

    Raises:
        ValueError: Unknown policy, ``n`` beyond the number of blocks, or a layer that matches
            no parameter.
    """
    check_choice("model.freeze.policy", policy, FREEZE_POLICIES)
    names = [name for name, _ in model.named_parameters()]
    layers = layers or ()  # YAML null
    prefixes: list[str] = ["head"]
    if policy == "all":
        prefixes = [""]
    elif policy == "last_n":
        if not 0 <= n <= len(model.blocks):
            raise ValueError(f"model.freeze.n={n} but {model.arch} has {len(model.blocks)} "
                             f"backbone blocks (see model.blocks)")
        prefixes += [p for block in model.blocks[len(model.blocks) - n:] for p in block]
    elif policy == "named":
        for layer in layers:
            layer = layer if layer.split(".")[0] in ("backbone", "head") else f"backbone.{layer}"
            if not any(_under(name, layer) for name in names):
                blocks = few_names([b[0] for b in model.blocks], 8)
                raise ValueError(f"model.freeze.layers: {layer!r} matches no parameter of "
                                 f"{model.arch}; its blocks are {blocks}")
            prefixes.append(layer)
    for name, param in model.named_parameters():
        param.requires_grad_(any(_under(name, p) for p in prefixes))


def _under(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")
