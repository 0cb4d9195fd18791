"""Architecture name (``config.json``'s ``architectures[0]``) → model class.

Classes are named by module path and imported on first use, so that parsing a config (which
imports this module for :data:`SUPPORTED_ARCHITECTURES`) never pulls in torch or the model code,
and so that ``arch`` → ``registry`` → ``llama`` → ``arch`` is not an import cycle.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

# One implementation covers the whole Llama family; the differences (qkv bias, q/k norm,
# head_dim, rope scaling) are flags of ModelArchConfig.
_MODEL_CLASSES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("vserve.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("vserve.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("vserve.models.llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("vserve.models.llama", "LlamaForCausalLM"),
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_MODEL_CLASSES)


def unsupported_architecture_message(architecture: str) -> str:
    return (
        f"Unsupported architecture {architecture!r}; vserve supports: "
        f"{', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def get_model_class(architecture: str) -> type[nn.Module]:
    """The model class for ``architecture``; ``ValueError`` naming it when unsupported."""
    try:
        module_name, class_name = _MODEL_CLASSES[architecture]
    except KeyError:
        raise ValueError(unsupported_architecture_message(architecture)) from None
    cls: type[nn.Module] = getattr(importlib.import_module(module_name), class_name)
    return cls
