"""vserve: a production LLM serving system."""

from typing import TYPE_CHECKING, Any

from vserve.protocol.sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]

if TYPE_CHECKING:
    from vserve.offline import LLM
    from vserve.outputs import CompletionOutput, RequestOutput


def __getattr__(name: str) -> Any:
    # Lazy: `import vserve` stays light for API servers that never build an LLM.
    if name == "LLM":
        from vserve.offline import LLM

        return LLM
    if name in ("RequestOutput", "CompletionOutput"):
        from vserve import outputs

        return getattr(outputs, name)
    raise AttributeError(name)
