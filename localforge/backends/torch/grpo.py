"""GRPO on torch through TRL's ``GRPOTrainer``, one optimizer step at a time.

TRL does what GRPO is: sampling the group of completions per prompt (transformers' ``generate``,
or vLLM in colocate mode on a CUDA host that has it), the rewards, the group-relative
advantages, the clipped objective with its KL towards the reference (for LoRA the same model
with the adapter switched off, so no copy), and the loss scaling for accumulation. localforge's
driver keeps what it keeps for SFT: which prompts a step sees (a function of seed and step), the
learning rate, checkpoints, resume and the manifest. So each step hands TRL the step's
generation batch (every prompt repeated once per generation, as TRL's own sampler would) through
``training_step``, ``grad_accum`` times, then clips and steps the optimizer the torch engine
already owns.

The TRL trainer is built when the engine is (its constructor re-seeds the process, so it must
run before a checkpoint's RNG state is restored). With one generation per optimizer step
(``steps_per_generation == grad_accum``, one iteration) no TRL state outlives a step, and the
RNG the engine saves with each checkpoint is all that sampling draws from: a resumed run samples
what an uninterrupted one would.
"""

from __future__ import annotations

import tempfile
from importlib.util import find_spec
from typing import Any

import torch

from localforge.backends.training import GrpoSetup, PromptBatch, group_fields


class TRLGrpo:
    def __init__(self, engine: Any, grpo: GrpoSetup):
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer

        self.engine, self.grpo = engine, grpo
        batch_size, grad_accum = grpo.batch_size, grpo.grad_accum
        self.grad_accum = grad_accum
        cuda = engine.device.type == "cuda"
        self.use_vllm = cuda and find_spec("vllm") is not None
        self._tmp = tempfile.TemporaryDirectory(prefix="localforge-grpo-")
        args = GRPOConfig(
            output_dir=self._tmp.name, report_to=[], save_strategy="no", logging_strategy="no",
            per_device_train_batch_size=batch_size * grpo.num_generations, gradient_accumulation_steps=grad_accum,
            steps_per_generation=grad_accum, num_iterations=1, num_generations=grpo.num_generations,
            max_completion_length=grpo.max_completion_length, beta=grpo.beta, epsilon=grpo.epsilon,
            temperature=grpo.temperature, top_p=grpo.top_p,
            scale_rewards="group" if grpo.scale_rewards else "none",
            reward_weights=list(grpo.reward_weights) or None, seed=engine.setup.seed,
            max_grad_norm=engine.setup.max_grad_norm or 0.0, learning_rate=1e-6, shuffle_dataset=False,
            log_completions=False, bf16=cuda and engine.setup.dtype == "bf16",
            fp16=cuda and engine.setup.dtype == "fp16", use_cpu=not cuda,
            use_vllm=self.use_vllm, vllm_mode="colocate", activation_checkpointing=engine.setup.gradient_checkpointing,
        )
        self.scores = _Scores(grpo)
        self.trl = GRPOTrainer(model=engine.model, reward_funcs=self.scores.functions(), args=args,
                               train_dataset=Dataset.from_list([{"prompt": [{"role": "user", "content": "-"}]}]),
                               processing_class=engine.tokenizer)
        self.trl.current_gradient_accumulation_steps = grad_accum

    def step(self, step: int, prompts: PromptBatch, lr: float) -> dict[str, float]:
        e, t, g = self.engine, self.trl, self.grpo
        for group in e.optimizer.param_groups:
            group["lr"] = lr
        t.state.global_step = step
        columns = group_fields(prompts.fields, 1)
        rows = [{"prompt": conv, **{k: columns[k][i] for k in columns if k not in _RESERVED}}
                for i, conv in enumerate(prompts.conversations) for _ in range(g.num_generations)]
        t._metrics["train"].clear()
        seen = t.state.num_input_tokens_seen
        t._buffered_inputs = None
        loss = 0.0
        for _ in range(self.grad_accum):
            loss += float(t.training_step(t.model, rows, None))
        if e.setup.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(e.params, e.setup.max_grad_norm)
        e.optimizer.step()
        e.optimizer.zero_grad(set_to_none=True)
        m = t._metrics["train"]
        out = {"loss": loss, "tokens": int(t.state.num_input_tokens_seen - seen),
               "reward": _mean(m.get("reward")), "reward_std": _mean(m.get("reward_std"))}
        for name in g.reward_names:
            out[f"reward/{name}"] = _mean(m.get(f"rewards/{name}/mean"))
        if m.get("kl"):
            out["kl"] = _mean(m["kl"])
        out["completion_length"] = _mean(m.get("completions/mean_length"))
        out["clipped_ratio"] = _mean(m.get("completions/clipped_ratio"))
        return out

    def close(self) -> None:
        self.trl = None
        self._tmp.cleanup()


_RESERVED = ("prompt", "completion", "completion_ids", "trainer_state", "log_extra", "log_metric", "environments")


class _Scores:
    """One TRL reward function per configured reward, all answered by one ``score`` call per batch
    (a reward such as teaching calls a student: it runs once per batch, not once per reward)."""

    def __init__(self, grpo: GrpoSetup):
        self.grpo = grpo
        self._key: tuple | None = None
        self._values: list[list[float]] = []

    def functions(self) -> list:
        fns = []
        for i, name in enumerate(self.grpo.reward_names):
            def fn(prompts, completions, _i=i, **fields):
                return self.values(prompts, completions, fields)[_i]

            fn.__name__ = name
            fns.append(fn)
        return fns

    def values(self, prompts: list, completions: list, fields: dict) -> list[list[float]]:
        texts = [_text(c) for c in completions]
        ptexts = [_text(p, role="user") for p in prompts]
        key = (tuple(ptexts), tuple(texts))
        if key != self._key:
            cols = {k: list(v) for k, v in fields.items() if k not in _RESERVED}
            self._values = self.grpo.score(ptexts, texts, cols)
            self._key = key
        return self._values


def _text(value: Any, role: str = "assistant") -> str:
    """A prompt's last user turn or a completion's text, from TRL's conversational shape or a string."""
    if isinstance(value, str):
        return value
    msgs = [m for m in value if m.get("role") == role] or list(value)
    content = msgs[-1].get("content", "") if msgs else ""
    if isinstance(content, list):  # content blocks
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content


def _mean(values) -> float:
    values = [float(v) for v in (values or []) if v == v]
    return sum(values) / len(values) if values else 0.0
