"""torch/transformers generation on CPU, CUDA or MPS, batched with left padding."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from localforge.backends.base import Backend
from localforge.backends.hf import NO_HUB_KERNELS, ensure_hf, quiet_transformers
from localforge.backends.torch import prefer_expandable_segments
from localforge.backends.types import (
    BackendUnavailable,
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
from localforge.errors import MissingDependency
from localforge.hardware import default_threads
from localforge.models import resolve

prefer_expandable_segments()  # torch is imported below, when a model loads


def pick_device(requested: str | None = None) -> str:
    import torch

    if requested and requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable(f"device '{requested}' asked for, but torch sees no CUDA GPU: use --device cpu")
        if requested == "mps" and not torch.backends.mps.is_available():
            raise BackendUnavailable("device 'mps' asked for, but torch sees no MPS: use --device cpu")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(device: str, requested: str | None = None):
    import torch

    if requested and requested != "auto":
        try:
            return getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(requested, requested))
        except AttributeError:
            raise BackendUnavailable(f"unknown dtype '{requested}': use auto, fp32, bf16 or fp16") from None
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32


class _StopOnStrings:
    """Ends each row once its new text contains a stop string.

    Decodes only the last few tokens per step: cheaper than transformers' ``stop_strings``,
    which rebuilds tables over the whole vocabulary on every call (~0.2 s here).
    """

    def __init__(self, tokenizer, stop: tuple[str, ...], prompt_width: int):
        self.tokenizer, self.stop, self.width = tokenizer, stop, prompt_width
        self.window = max(len(s) for s in stop) + 2  # every token is at least one character

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        tails = self.tokenizer.batch_decode(input_ids[:, max(self.width, input_ids.shape[1] - self.window):])
        return torch.tensor([any(s in t for s in self.stop) for t in tails], device=input_ids.device)


class TorchBackend(Backend):
    name = "torch"
    capabilities = Capabilities(batching=True)

    def __init__(
        self,
        model: str,
        device: str | None = None,
        dtype: str | None = None,
        threads: int | None = None,
        adapter: str | None = None,
        **options: Any,
    ):
        """``adapter``: a LoRA adapter folder (PEFT or mlx-lm, converted once) to load on the model."""
        super().__init__(model, **options)
        resolved = resolve(model)
        path = ensure_hf(resolved)
        if adapter:  # check and convert the adapter before the (slower) model load
            from localforge.adapters import as_format, fingerprint, misfit
            from localforge.backends.torch.fuse import quiet_peft

            adapter_dir = as_format(adapter, "peft", base=path)
            self.adapter_key = fingerprint(adapter)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads or default_threads())
        quiet_transformers()
        self.model_name = resolved.name
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype, **NO_HUB_KERNELS).to(self.device).eval()
        if adapter:
            try:
                from peft import PeftModel
            except ImportError:
                raise MissingDependency("loading a LoRA adapter on torch", "torch", "peft") from None
            try:
                with quiet_peft():
                    self.model = PeftModel.from_pretrained(self.model, str(adapter_dir)).to(self.device).eval()
            except (RuntimeError, ValueError, KeyError) as exc:
                raise misfit(adapter, model, exc) from None
        self.context_length = context_length(self.model.config)
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.eos_ids.add(self.tokenizer.eos_token_id)
        self._torch = torch

    def prompt_text(self, conv: Conversation) -> str:
        return self.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)

    def generate(self, conversations: list[Conversation], params: GenerationParams) -> list[ChatResult]:
        torch = self._torch
        prompts = [self.prompt_text(c) for c in conversations]
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        lengths = enc["attention_mask"].sum(dim=1).tolist()
        max_new = fit_to_context(self.name, self.model_name, lengths, params.max_tokens, self.context_length)
        enc = enc.to(self.device)
        width = enc["input_ids"].shape[1]
        kwargs = self._generate_kwargs(params, max_new, width)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        with Timer() as t, torch.inference_mode():
            out = self.model.generate(**enc, **kwargs)
        prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
        results = []
        for row, n_prompt in zip(out[:, width:].tolist(), prompt_lens, strict=True):
            n, hit_eos = len(row), False
            for i, tok in enumerate(row):
                if tok in self.eos_ids:
                    n, hit_eos = i, True
                    break
            text = self.tokenizer.decode(row[:n], skip_special_tokens=True)
            text, hit_stop = truncate_at_stop(text, params.stop)
            results.append(self.result(text, n_prompt, n, "stop" if hit_eos or hit_stop else "length", t.seconds))
        return results

    def _generate_kwargs(self, params: GenerationParams, max_new: int, width: int) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max_new,
            pad_token_id=self.tokenizer.pad_token_id,
            do_sample=not params.greedy,
        )
        if params.greedy:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        kwargs["stopping_criteria"] = [_StopOnStrings(self.tokenizer, params.stop, width)] if params.stop else []
        return kwargs

    def _stream(self, conv: Conversation, params: GenerationParams) -> Generator[str, None, ChatResult]:
        """``model.generate`` in a thread with a streamer that hands over each new token id; the
        text is decoded as it grows and sent once no stop string can still begin in it. Closing
        the stream stops the generation at its next token."""
        import queue
        import threading
        import time

        from transformers.generation.streamers import BaseStreamer

        torch = self._torch
        enc = self.tokenizer([self.prompt_text(conv)], return_tensors="pt", add_special_tokens=False)
        n_prompt = enc["input_ids"].shape[1]
        max_new = fit_to_context(self.name, self.model_name, [n_prompt], params.max_tokens, self.context_length)
        kwargs = self._generate_kwargs(params, max_new, n_prompt)
        cancel = threading.Event()
        kwargs["stopping_criteria"].append(
            lambda input_ids, scores, **kw: torch.full((input_ids.shape[0],), cancel.is_set(), device=input_ids.device))
        ids_q: queue.Queue = queue.Queue()

        class TokenIds(BaseStreamer):
            seen_prompt = False

            def put(self, value):
                if self.seen_prompt:
                    ids_q.put(value.reshape(-1).tolist())
                self.seen_prompt = True

            def end(self):
                ids_q.put(None)

        failed: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(**enc.to(self.device), **kwargs, streamer=TokenIds())
            except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
                failed.append(exc)
                ids_q.put(None)

        if params.seed is not None:
            torch.manual_seed(params.seed)
        t0 = time.perf_counter()
        worker = threading.Thread(target=run, name="localforge-torch-stream", daemon=True)
        worker.start()
        ids: list[int] = []
        sent, finish = 0, "length"
        try:
            while finish == "length" and (new := ids_q.get()) is not None:
                for tok in new:
                    if tok in self.eos_ids:
                        finish = "stop"
                        break
                    ids.append(tok)
                safe, hit = stream_cut(self.tokenizer.decode(ids, skip_special_tokens=True), params.stop)
                finish = "stop" if hit else finish
                if len(safe) > sent:
                    yield safe[sent:]
                    sent = len(safe)
        finally:
            cancel.set()
            worker.join()
        if failed:
            raise failed[0]
        text, hit = truncate_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), params.stop)
        if len(text) > sent:  # a tail held back for a stop string that never came
            yield text[sent:]
        return self.result(text, n_prompt, len(ids), "stop" if hit else finish, time.perf_counter() - t0)

    def close(self) -> None:
        self.model = None
