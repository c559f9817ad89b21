"""An Ollama Modelfile for an exported GGUF: ``FROM``, a ``TEMPLATE`` in Go's template syntax
translated from the model's Jinja chat template, ``SYSTEM`` for a default system prompt,
``PARAMETER stop`` for the stop tokens and a few others.

The translation does not parse Jinja. It renders the model's template (with jinja2's sandbox,
as transformers does) on marked messages and reads off, per role, the text written before and
after a message's content, the text that opens the answer (the generation prompt), and a system
prompt the template adds when a conversation has none. It then re-renders other conversations
and checks that those pieces rebuild each of them exactly. Templates in which every message is
written on its own (ChatML as in SmolLM2 and Qwen, Llama 3, Phi-3, ...) pass; a template that
folds the system prompt into the first user turn, alternates checks, or writes a message
differently by position fails with a line saying which conversation did not rebuild.

A ``{{ bos_token }}`` at the start is left out of the TEMPLATE: llama.cpp (and so Ollama) adds
the BOS token itself when the GGUF says to.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from localforge.errors import ConfigError, LocalforgeError

ROLES = ("system", "user", "assistant")
BOS = "\x02BOS\x02"  # stands in for the bos_token variable, so only the template's own use shows
MARK = {"system": "\x02S1\x02", "user": "\x02U1\x02", "assistant": "\x02A1\x02", "user2": "\x02U2\x02"}


@dataclass
class ChatShape:
    """What a per-message chat template writes: ``pre[role] + content + post[role]`` per message,
    ``gen`` to open the answer, ``default_system`` when a conversation has no system message."""

    pre: dict[str, str]
    post: dict[str, str]
    gen: str
    default_system: str | None = None
    bos: bool = False  # the template starts with {{ bos_token }}
    stops: list[str] = field(default_factory=list)

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The conversation as this shape writes it (BOS left out)."""
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        text = "".join(self.pre[m["role"]] + m["content"] + self.post[m["role"]] for m in messages)
        return text + (self.gen if add_generation_prompt else "")

    def go_template(self) -> str:
        """Ollama's TEMPLATE: each message of ``.Messages`` by its role, then the answer's opening."""
        branches = []
        for i, role in enumerate(ROLES):
            keyword = "if" if i == 0 else "else if"
            branches.append(f'{{{{ {keyword} eq .Role "{role}" }}}}{_go_text(self.pre[role])}{{{{ .Content }}}}'
                            f"{_go_text(self.post[role])}")
        return "{{ range .Messages }}" + "".join(branches) + "{{ end }}{{ end }}" + _go_text(self.gen)


def _go_text(text: str) -> str:
    """Literal text in a Go template: only ``{{`` needs quoting."""
    return text.replace("{{", '{{ "{{" }}')


# --- reading the template -----------------------------------------------------------------------


def read_template(model_dir: Path) -> tuple[str, dict]:
    """The model folder's Jinja chat template and its tokenizer config."""
    tok_cfg = _json(model_dir / "tokenizer_config.json")
    jinja = model_dir / "chat_template.jinja"
    template = jinja.read_text() if jinja.is_file() else tok_cfg.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not isinstance(template, str) or not template.strip():
        raise ConfigError(f"{model_dir} has no chat template (chat_template.jinja or tokenizer_config.json): "
                          "an Ollama TEMPLATE cannot be derived; export with --to gguf")
    return template, tok_cfg


def chat_shape(model_dir: Path) -> ChatShape:
    """Read the chat template of the HF folder ``model_dir`` as a ``ChatShape``, or fail in one line
    naming what is not supported."""
    template, tok_cfg = read_template(model_dir)
    render = _renderer(template, tok_cfg, model_dir)
    S, U, A, U2 = (MARK[k] for k in ("system", "user", "assistant", "user2"))
    su = render([("system", S), ("user", U)], False)
    sua = render([("system", S), ("user", U), ("assistant", A)], False)
    suau = render([("system", S), ("user", U), ("assistant", A), ("user", U2)], False)
    bos = su.startswith(BOS)

    def cut(text: str) -> str:
        return text[len(BOS):] if bos and text.startswith(BOS) else text

    su, sua, suau = cut(su), cut(sua), cut(suau)
    unsupported = f"the chat template of {model_dir} does not write each message on its own"
    try:
        post_u = _after(su, U)
        post_a = _after(sua, A)
        pre_s = su[:su.index(S)]
        between_su = su[su.index(S) + len(S):su.index(U)]
        pre_a = sua[sua.index(U) + len(U) + len(post_u):sua.index(A)]
        pre_u = suau[suau.index(A) + len(A) + len(post_a):suau.index(U2)]
    except ValueError:
        raise ConfigError(f"{unsupported} (a message's text is missing or out of order); export with --to gguf "
                          "and write the Modelfile's TEMPLATE by hand") from None
    if not between_su.endswith(pre_u):
        raise ConfigError(f"{unsupported} (the first user turn is written unlike the others); export with "
                          "--to gguf and write the Modelfile's TEMPLATE by hand")
    post_s = between_su[:len(between_su) - len(pre_u)]
    gen = cut(render([("system", S), ("user", U)], True))
    if not gen.startswith(su):
        raise ConfigError(f"{unsupported} (the generation prompt changes what comes before it)")
    shape = ChatShape({"system": pre_s, "user": pre_u, "assistant": pre_a},
                      {"system": post_s, "user": post_u, "assistant": post_a}, gen[len(su):], bos=bos)
    lone = cut(render([("user", U)], False))
    if lone != shape.render([{"role": "user", "content": U}], False):
        head, tail = pre_s, post_s + pre_u + U + post_u
        if lone.startswith(head) and lone.endswith(tail) and len(lone) >= len(head) + len(tail):
            shape.default_system = lone[len(head):len(lone) - len(tail)]
    for messages, gen_prompt in _probes():
        want = cut(render([(r, c) for r, c in messages], gen_prompt))
        got = shape.render([{"role": r, "content": c} for r, c in messages], gen_prompt)
        if want != got:
            roles = "/".join(r for r, _ in messages)
            raise ConfigError(f"{unsupported}: a {roles} conversation renders as {want[:80]!r}, not as its "
                              f"messages one by one; export with --to gguf and write the TEMPLATE by hand")
    shape.stops = _stops(shape, tok_cfg, model_dir)
    return shape


def _probes() -> list[tuple[list[tuple[str, str]], bool]]:
    s, u, a, u2, a2 = "Be brief.", "Hi there", "Hello!", "And then?", "Then this."
    return [
        ([("user", u)], True),
        ([("user", u), ("assistant", a), ("user", u2)], True),
        ([("system", s), ("user", u), ("assistant", a), ("user", u2), ("assistant", a2)], False),
        ([("system", s), ("user", u), ("assistant", a), ("user", u2)], True),
    ]


def _after(text: str, mark: str) -> str:
    return text[text.index(mark) + len(mark):]


def _renderer(template: str, tok_cfg: dict, model_dir: Path):
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as exc:
        raise LocalforgeError(f"reading the chat template needs jinja2 (no module '{exc.name}'): "
                              "pip install jinja2") from None

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value, indent=None, **_: json.dumps(value, indent=indent, ensure_ascii=False)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: "26 Jul 2024")
    try:
        compiled = env.from_string(template)
    except TemplateError as exc:
        raise ConfigError(f"the chat template of {model_dir} is not valid Jinja: {exc}") from None
    eos = _token_text(tok_cfg.get("eos_token")) or ""

    def render(messages: list[tuple[str, str]], add_generation_prompt: bool) -> str:
        try:
            return compiled.render(messages=[{"role": r, "content": c} for r, c in messages],
                                   add_generation_prompt=add_generation_prompt, bos_token=BOS, eos_token=eos)
        except TemplateError as exc:
            roles = "/".join(r for r, _ in messages)
            raise ConfigError(f"the chat template of {model_dir} refuses a {roles} conversation ({exc}); "
                              "export with --to gguf and write the Modelfile's TEMPLATE by hand") from None

    return render


def _stops(shape: ChatShape, tok_cfg: dict, model_dir: Path) -> list[str]:
    """The end of an answer (what follows the assistant's content), the EOS tokens, and the special
    token that opens the next user turn."""
    specials = _special_tokens(model_dir, tok_cfg)
    found = [shape.post["assistant"].strip(), _token_text(tok_cfg.get("eos_token")) or ""]
    eos_ids = _json(model_dir / "generation_config.json").get("eos_token_id")
    for token_id in eos_ids if isinstance(eos_ids, list) else [eos_ids]:
        found.append(specials.get(token_id, ""))
    opener = re.match(r"\s*(<[^<>\s]+>|\[[A-Z_]+\])", shape.pre["user"])
    if opener and opener.group(1) in specials.values():
        found.append(opener.group(1))
    return [s for i, s in enumerate(found) if s and s not in found[:i]]


def _special_tokens(model_dir: Path, tok_cfg: dict) -> dict[int, str]:
    tokens = {}
    for t in _json(model_dir / "tokenizer.json").get("added_tokens") or []:
        if isinstance(t, dict) and t.get("special"):
            tokens[t.get("id")] = t.get("content")
    for key, t in (tok_cfg.get("added_tokens_decoder") or {}).items():
        if isinstance(t, dict) and t.get("special") and str(key).isdigit():
            tokens[int(key)] = t.get("content")
    return tokens


def _token_text(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


# --- the file -----------------------------------------------------------------------------------


def modelfile(gguf_name: str, shape: ChatShape, model_dir: Path) -> str:
    """The Modelfile's text for ``./gguf_name`` beside it."""
    template = shape.go_template()
    for what, text in (("TEMPLATE", template), ("SYSTEM", shape.default_system or "")):
        if '"""' in text:
            raise ConfigError(f"the chat template of {model_dir} writes '\"\"\"', which a Modelfile {what} "
                              "cannot hold; write the Modelfile by hand")
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    if shape.default_system is not None:
        lines.append(f'SYSTEM """{shape.default_system}"""')
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in shape.stops]
    for key, value in _parameters(model_dir).items():
        lines.append(f"PARAMETER {key} {value}")
    return "\n".join(lines) + "\n"


def _parameters(model_dir: Path) -> dict[str, object]:
    """Sampling defaults the model ships (generation_config.json) and its context length."""
    gen = _json(model_dir / "generation_config.json")
    params: dict[str, object] = {}
    for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                         ("repeat_penalty", "repetition_penalty")):
        if isinstance(gen.get(theirs), int | float) and not isinstance(gen.get(theirs), bool):
            params[ours] = gen[theirs]
    ctx = _json(model_dir / "config.json").get("max_position_embeddings")
    if isinstance(ctx, int) and ctx > 0:
        params["num_ctx"] = min(ctx, 8192)  # the model's context, kept to what a laptop holds
    return params
