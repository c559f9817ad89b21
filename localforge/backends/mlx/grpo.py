"""GRPO on MLX through mlx-lm-lora's sampler and objective, one optimizer step at a time.

mlx-lm-lora (a maintained GRPO/DPO trainer on mlx-lm) does the GRPO parts: ``generate_grpo``
samples each prompt's group with mlx-lm's batch generator (the prompt's KV cache shared by the
group), ``calculate_rewards_and_advantages`` weights the rewards and normalises them per group,
and ``grpo_loss`` is the clipped objective with its KL towards a frozen reference. localforge's
driver keeps the rest, as for SFT: which prompts a step sees, the learning rate, checkpoints,
resume and the manifest; the engine's AdamW and gradient clipping are the SFT engine's.

The reference is a second, frozen copy of the starting model (loaded only when ``beta > 0``).
Sampling draws from ``mx.random`` reseeded from (seed, step) at the start of every step, so a
resumed run samples what an uninterrupted one would. mlx-lm-lora always divides advantages by
the group's spread (``scale_rewards: false`` is refused here, not ignored).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from localforge.backends.training import GrpoSetup, PromptBatch, group_fields
from localforge.errors import ConfigError


class MLXGrpo:
    def __init__(self, engine: Any, grpo: GrpoSetup):
        import mlx.nn as nn
        from mlx_lm.tokenizer_utils import TokenizerWrapper
        from mlx_lm_lora.trainer import grpo_trainer

        if not grpo.scale_rewards:
            raise ConfigError("config key 'grpo.scale_rewards': mlx-lm-lora always scales advantages by the "
                              "group's spread: set it to true, or use another backend")
        self.engine, self.grpo, self.lib = engine, grpo, grpo_trainer
        self.tokenizer = TokenizerWrapper(engine.tokenizer)
        self.reference = self._reference() if grpo.beta > 0 else None
        self.value_and_grad = nn.value_and_grad(engine.model, grpo_trainer.grpo_loss)

    def _reference(self):
        from mlx_lm.utils import load_model

        from localforge.backends.mlx.load import model_config
        from localforge.backends.mlx.train import DTYPES

        e = self.engine
        ref, _ = load_model(Path(e.setup.model_path), model_config=model_config(e.setup.model_path))
        ref.set_dtype(getattr(e.mx, DTYPES[e.setup.dtype]))
        ref.freeze()
        ref.eval()
        return ref

    def step(self, step: int, prompts: PromptBatch, lr: float) -> dict[str, float]:
        from mlx.optimizers import clip_grad_norm
        from mlx.utils import tree_map

        e, g, mx = self.engine, self.grpo, self.engine.mx
        mx.random.seed(e.setup.seed * 1_000_003 + step)  # sampling: a function of (seed, step)
        tokens = [self._encode(c) for c in prompts.conversations]
        completions, texts, indices = self.lib.generate_grpo(
            e.model, self.tokenizer, tokens, max_tokens=g.max_completion_length, group_size=g.num_generations,
            batch_size=max(1, g.batch_size), end_token="", temperature=g.temperature, top_p=g.top_p, top_k=0,
            min_p=0.0)
        e.model.train()
        texts_in = prompts.texts
        fields = group_fields(prompts.fields, 1)
        scores = self._scores(texts_in, texts, indices, fields)
        advantages, reward_metrics = self.lib.calculate_rewards_and_advantages(
            reward_funcs=scores, expanded_prompts=[texts_in[i] for i in indices], all_completion_texts=texts,
            expanded_answers=list(range(len(texts))), expanded_types=[None] * len(texts), batch_indices=indices,
            unique_prompt_indices=sorted(set(indices)), reward_weights=list(g.reward_weights) or None)
        batch = (tokens, [[] for _ in tokens], texts_in, ["" for _ in tokens], None)
        # micro-batches of whole groups; each one's gradient weighted by its share of the completions
        per = max(1, g.batch_size) * g.num_generations
        grads, loss, kl = None, 0.0, 0.0
        for start in range(0, len(completions), per):
            stop = min(start + per, len(completions))
            weight = (stop - start) / len(completions)
            (value, _, metrics), grad = self.value_and_grad(
                e.model, self.reference, batch, completions=completions[start:stop],
                completion_texts=texts[start:stop], batch_indices=indices[start:stop],
                advantages=advantages[start:stop], beta=g.beta, epsilon=g.epsilon, epsilon_high=g.epsilon,
                max_tokens=g.max_completion_length, importance_sampling_level="token", grpo_loss_type="grpo")
            grad = tree_map(lambda x, w=weight: x * w, grad)
            grads = grad if grads is None else tree_map(mx.add, grads, grad)
            mx.eval(value, grads, metrics["kl"])
            loss += value.item() * weight
            kl += metrics["kl"].item() * weight
        if e.setup.max_grad_norm:
            grads, _ = clip_grad_norm(grads, e.setup.max_grad_norm)
        e.optimizer.learning_rate = lr
        e.optimizer.update(e.model, grads)
        mx.eval(e.model.parameters(), e.optimizer.state)
        lengths = [int(c.size) for c in completions]
        out = {"loss": loss, "tokens": sum(len(tokens[i]) for i in indices) + sum(lengths),
               "reward": float(reward_metrics["total_rewards_mean"].item()),
               "reward_std": float(reward_metrics["grouped_rewards_std"].item())}
        for name in g.reward_names:
            out[f"reward/{name}"] = float(reward_metrics[f"{name}_mean"].item())
        if self.reference is not None:
            out["kl"] = kl
        out["completion_length"] = sum(lengths) / max(1, len(lengths))
        out["clipped_ratio"] = sum(n >= g.max_completion_length for n in lengths) / max(1, len(lengths))
        return out

    def _encode(self, conversation: list[dict]) -> list[int]:
        ids = self.engine.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def _scores(self, prompts: list[str], texts: list[str], indices: list[int], fields: dict) -> list:
        """One reward function per configured reward (mlx-lm-lora calls each by name), answered by
        one ``score`` call; ``answer`` carries each completion's position, to find its row's fields."""
        cols = {k: [v[i] for i in indices] for k, v in fields.items()}
        cache: dict = {}

        def values() -> list[list[float]]:
            if "v" not in cache:
                cache["v"] = self.grpo.score([prompts[i] for i in indices], list(texts), cols)
            return cache["v"]

        fns = []
        for k, name in enumerate(self.grpo.reward_names):
            def fn(prompts=None, completions=None, answer=None, types=None, _k=k):
                return values()[_k]

            fn.__name__ = name
            fns.append(fn)
        return fns

    def close(self) -> None:
        self.reference = self.value_and_grad = None
