"""vLLM's offline engine (``vllm.LLM``) on a CUDA host: batched generation and guided JSON.

Needs the ``vllm`` extra and an NVIDIA GPU. vLLM loads HF folders; a GGUF reference is
converted once like for torch.
"""

from __future__ import annotations

from typing import Any

from localforge.backends.base import Backend
from localforge.backends.spec import EngineSpec
from localforge.backends.types import (
    BackendUnavailable,
    Capabilities,
    ChatResult,
    Conversation,
    GenerationParams,
    Timer,
)
from localforge.models import resolve

SPECS = (
    EngineSpec(name="vllm", label="vLLM", extra="vllm", runs_on="NVIDIA GPUs (offline engine)",
               generate="localforge.backends.vllm_engine:VLLMBackend", requires=("vllm",),
               devices=("cuda",), prefers=("cuda",), rank=0),
)


class VLLMBackend(Backend):
    name = "vllm"
    capabilities = Capabilities(batching=True, json_schema=True)

    def __init__(self, model: str, dtype: str = "auto", gpu_memory_utilization: float = 0.85,
                 max_model_len: int | None = None, **options: Any):
        super().__init__(model, **options)
        from localforge.backends.hf import ensure_hf

        resolved = resolve(model)
        path = ensure_hf(resolved)
        try:
            import vllm
        except ImportError as exc:
            raise BackendUnavailable(f"backend 'vllm' cannot import vllm ({exc}): pip install 'localforge[vllm]'") from exc
        import torch

        if not torch.cuda.is_available():
            raise BackendUnavailable("backend 'vllm' needs an NVIDIA GPU; use --backend torch or llamacpp here")
        self._vllm = vllm
        self.model_name = resolved.name
        kwargs: dict[str, Any] = dict(model=path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization)
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        self.llm = vllm.LLM(**kwargs)

    def sampling_params(self, params: GenerationParams):
        kwargs: dict[str, Any] = dict(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            stop=list(params.stop) or None,
            seed=params.seed,
        )
        if params.json_schema is not None:
            from vllm.sampling_params import StructuredOutputsParams

            kwargs["structured_outputs"] = StructuredOutputsParams(json=params.json_schema)
        return self._vllm.SamplingParams(**kwargs)

    def generate(self, conversations: list[Conversation], params: GenerationParams) -> list[ChatResult]:
        with Timer() as t:
            outs = self.llm.chat(conversations, self.sampling_params(params), use_tqdm=False)
        results = []
        for out in outs:
            gen = out.outputs[0]
            results.append(self.result(gen.text, len(out.prompt_token_ids or []), len(gen.token_ids),
                                       gen.finish_reason, t.seconds))
        return results

    def close(self) -> None:
        self.llm = None
