"""mlx-lm generation: Metal on Apple Silicon, the CPU elsewhere (mlx[cpu]).

One conversation (and ``stream``) goes through ``mlx_lm.stream_generate`` (stop strings end it early); a
batch goes through ``mlx_lm.batch_generate`` (continuous batching).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from localforge.backends.base import Backend
from localforge.backends.hf import ensure_hf
from localforge.backends.mlx.load import model_config
from localforge.backends.types import (
    Capabilities,
    ChatResult,
    Conversation,
    GenerationParams,
    Timer,
    context_length,
    fit_to_context,
    stream_cut,
    truncate_at_stop,
)
from localforge.models import resolve


class MLXBackend(Backend):
    name = "mlx"
    capabilities = Capabilities(batching=True)

    def __init__(self, model: str, adapter: str | None = None, **options: Any):
        """``adapter``: a LoRA adapter folder (mlx-lm or PEFT, converted once) to load on the model."""
        super().__init__(model, **options)
        resolved = resolve(model)
        path = ensure_hf(resolved)
        adapter_path = None
        if adapter:
            from localforge.adapters import as_format, fingerprint

            adapter_path = str(as_format(adapter, "mlx", base=path))
            self.adapter_key = fingerprint(adapter)
        import mlx.core as mx
        import mlx_lm

        self._mx, self._mlx_lm = mx, mlx_lm
        self.model_name = resolved.name
        try:
            self.model, self.tokenizer = mlx_lm.load(path, adapter_path=adapter_path, model_config=model_config(path))
        except (ValueError, KeyError) as exc:
            if not adapter:
                raise
            from localforge.adapters import misfit

            raise misfit(adapter, model, exc) from None
        self.context_length = context_length(_read_config(path))

    def prompt_ids(self, conv: Conversation) -> list[int]:
        text = self.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _sampler(self, params: GenerationParams):
        from mlx_lm.sample_utils import make_sampler

        return make_sampler(temp=params.temperature, top_p=params.top_p if params.top_p < 1 else 0.0)

    def generate(self, conversations: list[Conversation], params: GenerationParams) -> list[ChatResult]:
        if params.seed is not None:
            self._mx.random.seed(params.seed)
        prompts = [self.prompt_ids(c) for c in conversations]
        max_tokens = fit_to_context(self.name, self.model_name, [len(p) for p in prompts], params.max_tokens,
                                    self.context_length)
        params = params.with_(max_tokens=max_tokens)
        if len(prompts) == 1:
            return [self._stream_one(prompts[0], params)]
        return self._batch(prompts, params)

    def _stream_one(self, prompt: list[int], params: GenerationParams) -> ChatResult:
        deltas = self._deltas(prompt, params)
        while True:
            try:
                next(deltas)
            except StopIteration as done:
                return done.value

    def _stream(self, conv: Conversation, params: GenerationParams) -> Generator[str, None, ChatResult]:
        if params.seed is not None:
            self._mx.random.seed(params.seed)
        prompt = self.prompt_ids(conv)
        max_tokens = fit_to_context(self.name, self.model_name, [len(prompt)], params.max_tokens, self.context_length)
        return (yield from self._deltas(prompt, params.with_(max_tokens=max_tokens)))

    def _deltas(self, prompt: list[int], params: GenerationParams) -> Generator[str, None, ChatResult]:
        """``mlx_lm.stream_generate``: text deltas, held back while a stop string may be starting."""
        text, sent, n_gen, finish = "", 0, 0, "length"
        with Timer() as t:
            for resp in self._mlx_lm.stream_generate(
                self.model, self.tokenizer, prompt, max_tokens=params.max_tokens,
                sampler=self._sampler(params),
            ):
                text += resp.text
                n_gen = resp.generation_tokens
                safe, hit = stream_cut(text, params.stop) if params.stop else (text, False)
                if len(safe) > sent:
                    yield safe[sent:]
                    sent = len(safe)
                if hit:
                    text, finish = safe, "stop"
                    break
                if resp.finish_reason is not None:
                    finish = resp.finish_reason
                    if finish == "stop":
                        n_gen -= 1  # the end-of-sequence token is not part of the answer
        if len(text) > sent:
            yield text[sent:]
        return self.result(text, len(prompt), n_gen, finish, t.seconds)

    def _batch(self, prompts: list[list[int]], params: GenerationParams) -> list[ChatResult]:
        with Timer() as t:
            out = self._mlx_lm.batch_generate(
                self.model, self.tokenizer, prompts, max_tokens=params.max_tokens,
                sampler=self._sampler(params), return_token_ids=True,
            )
        results = []
        for prompt, text, ids in zip(prompts, out.texts, out.token_ids, strict=True):
            text, hit = truncate_at_stop(text, params.stop)
            finish = "length" if len(ids) >= params.max_tokens and not hit else "stop"
            results.append(self.result(text, len(prompt), len(ids), finish, t.seconds))
        return results

    def close(self) -> None:
        self.model = None


def _read_config(path) -> dict:
    import json
    from pathlib import Path

    try:
        return json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
