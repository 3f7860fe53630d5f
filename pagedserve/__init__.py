"""pagedserve: a PagedAttention LLM serving engine written in Python."""

from pagedserve.beam_search import BeamSearchParams
from pagedserve.config import EngineConfig
from pagedserve.inputs import TextPrompt, TokensPrompt
from pagedserve.lora import LoRARequest
from pagedserve.outputs import CompletionOutput, RequestOutput
from pagedserve.pooling_params import PoolingParams
from pagedserve.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"

__all__ = ["LLM", "BeamSearchParams", "CompletionOutput", "EngineConfig", "LoRARequest", "PoolingParams",
           "RequestOutput", "RequestOutputKind", "SamplingParams", "StructuredOutputsParams", "TextPrompt",
           "TokensPrompt", "__version__"]


def __getattr__(name: str):
    # LLM pulls in torch and transformers: import it only when asked for.
    if name == "LLM":
        from pagedserve.entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)
