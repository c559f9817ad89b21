"""llama.cpp in-process, through llama-cpp-python, on a GGUF file."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from localforge.backends.base import Backend
from localforge.backends.spec import EngineSpec
from localforge.backends.types import (
    BackendUnavailable,
    Capabilities,
    ChatResult,
    Conversation,
    GenerationParams,
    InvalidResponse,
    RequestTooLarge,
    Timer,
    Unsupported,
    first_line,
)
from localforge.errors import CorruptFile
from localforge.models import resolve

SPECS = (
    EngineSpec(name="llamacpp", label="llama.cpp", extra="llamacpp", runs_on="CPU, Metal, CUDA (GGUF files)",
               generate="localforge.backends.llamacpp:LlamaCppBackend", requires=("llama_cpp",),
               devices=("cpu", "metal", "cuda"), formats=("gguf",), rank=1),
)


class LlamaCppBackend(Backend):
    name = "llamacpp"
    capabilities = Capabilities(batching=False, json_schema=True, json_mode=True, grammar=True)

    def __init__(
        self,
        model: str,
        n_ctx: int = 4096,
        threads: int | None = None,
        n_gpu_layers: int = -1,
        **options: Any,
    ):
        super().__init__(model, **options)
        resolved = resolve(model)
        if not resolved.gguf_path:
            raise Unsupported(
                f"backend 'llamacpp' loads .gguf files and model '{model}' has none: "
                "use --backend torch or mlx, or pass a .gguf file"
            )
        from localforge.hardware import default_threads

        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise BackendUnavailable(
                f"backend 'llamacpp' cannot import llama_cpp ({exc}): pip install 'localforge[llamacpp]'"
            ) from exc
        self.model_name = resolved.name
        # One thread count for both phases. llama-cpp-python's defaults are half the cores for
        # tokens and *all* of them for the prompt (n_threads_batch); its wheels use OpenMP, whose
        # threads spin at each barrier, so a prompt on more threads than the cores free (another
        # job on a small machine) stalls: 8 short chats took 42 s instead of 2.2 s on a 2-core VM
        # with one core busy. --threads / $LOCALFORGE_THREADS must hold for the prompt too.
        n_threads = threads or default_threads()
        try:
            self.llm = Llama(
                model_path=resolved.gguf_path,
                n_ctx=n_ctx,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                n_gpu_layers=n_gpu_layers,
                verbose=False,
            )
        except ValueError as exc:  # "Failed to load model from file: PATH" (bad metadata, unknown architecture)
            raise CorruptFile(resolved.gguf_path, f"llama.cpp cannot load it: {first_line(exc)}",
                              "download or convert it again with a current llama.cpp") from None

    def generate(self, conversations: list[Conversation], params: GenerationParams) -> list[ChatResult]:
        return [self._one(conv, params) for conv in conversations]

    def _kwargs(self, conv: Conversation, params: GenerationParams) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            messages=conv,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=0,  # plain temperature + top-p, as on the other backends
            min_p=0.0,
            repeat_penalty=1.0,
            stop=list(params.stop) or None,
            seed=params.seed,
        )
        if params.grammar is not None:  # the grammar alone: a response_format would replace it
            from llama_cpp import LlamaGrammar

            from localforge.backends.grammar import check_gbnf

            check_gbnf(params.grammar)  # a grammar llama.cpp cannot parse would crash the process
            kwargs["grammar"] = LlamaGrammar.from_string(params.grammar, verbose=False)
        elif params.json_schema is not None:
            kwargs["response_format"] = {"type": "json_object", "schema": params.json_schema}
        elif params.json_object:
            kwargs["response_format"] = {"type": "json_object"}
        return kwargs

    def _one(self, conv: Conversation, params: GenerationParams) -> ChatResult:
        kwargs = self._kwargs(conv, params)
        try:
            with Timer() as t:
                out = self.llm.create_chat_completion(**kwargs)
        except ValueError as exc:
            raise _too_large(exc) from None
        try:
            choice = out["choices"][0]
            usage = out["usage"]
            return self.result(choice["message"]["content"] or "", usage["prompt_tokens"], usage["completion_tokens"],
                               choice.get("finish_reason"), t.seconds)
        except (KeyError, IndexError, TypeError) as exc:
            raise InvalidResponse(f"llama.cpp returned an unexpected completion: {exc!r}") from exc

    def _stream(self, conv: Conversation, params: GenerationParams) -> Generator[str, None, ChatResult]:
        """Token by token through ``create_chat_completion(stream=True)``. Its chunks carry no
        usage: the prompt's tokens are what the context holds when the first text arrives, the
        answer's are the text chunks (one per token; a character split across tokens waits
        for the rest)."""
        import time

        t0 = time.perf_counter()
        chunks = self.llm.create_chat_completion(**self._kwargs(conv, params), stream=True)
        text, n_chunks, prompt, finish = [], 0, None, None
        try:
            for chunk in chunks:
                choice = chunk["choices"][0]
                piece = choice.get("delta", {}).get("content")
                if piece:
                    if prompt is None:
                        prompt = self.llm.n_tokens
                    n_chunks += 1
                    text.append(piece)
                    yield piece
                finish = choice.get("finish_reason") or finish
        except ValueError as exc:
            raise _too_large(exc) from None
        except (KeyError, IndexError, TypeError) as exc:
            raise InvalidResponse(f"llama.cpp returned an unexpected chunk: {exc!r}") from exc
        finally:
            chunks.close()
        prompt = self.llm.n_tokens if prompt is None else prompt
        n_gen = max(n_chunks, self.llm.n_tokens - prompt)
        return self.result("".join(text), prompt, n_gen, finish, time.perf_counter() - t0)

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()
            self.llm = None


def _too_large(exc: ValueError) -> Exception:
    if "context window" in str(exc):
        return RequestTooLarge(f"llamacpp: {exc}; use shorter input or fewer max_tokens, or a larger n_ctx")
    return exc
