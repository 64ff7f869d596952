"""Render a model's own chat template (GGUF tokenizer.chat_template) in a Jinja2 sandbox."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import structlog
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mongarsd.errors import ValidationError

log = structlog.get_logger("mongarsd.inference.chat_template")

# Used when a model ships no template: ChatML, which most small instruct models follow.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MAX_TEMPLATE_CHARS = 256 * 1024


class _IgnoreGenerationTags(jinja2.ext.Extension):
    """Accept HuggingFace's `{% generation %}` tag as a no-op."""

    tags: set[str] = {"generation"}  # noqa: RUF012  (jinja2 declares it an instance attribute)

    def parse(self, parser: Any) -> Any:
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise ValidationError("chat template refused the messages: " + str(message), param="messages")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled chat template (same Jinja2 settings as transformers/llama-cpp-python)."""

    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(
            loader=jinja2.BaseLoader(),
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_IgnoreGenerationTags, jinja2.ext.loopcontrols],
        )
        env.filters["tojson"] = _tojson
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.is_fallback = False
        text = source if source and len(source) <= MAX_TEMPLATE_CHARS else None
        try:
            self._template = env.from_string(text or CHATML_TEMPLATE)
        except jinja2.TemplateError as err:
            # the model file is untrusted: a broken template degrades to ChatML, loudly
            log.warning("chat_template_invalid", error=str(err))
            text = None
            self._template = env.from_string(CHATML_TEMPLATE)
        self.is_fallback = text is None
        self.source = text or CHATML_TEMPLATE

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        """Render `messages` to prompt text; template errors become ValidationError."""
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                add_generation_prompt=add_generation_prompt,
                raise_exception=_raise_exception,
                strftime_now=_strftime_now,
                **extra,
            )
        except ValidationError:
            raise
        except jinja2.TemplateError as err:
            raise ValidationError("chat template failed: " + str(err)[:200], param="messages") from err
        # templates index into messages freely: malformed messages fail in these ways
        except (TypeError, KeyError, AttributeError, ValueError, IndexError) as err:
            raise ValidationError("messages do not fit the chat template: " + str(err)[:200], param="messages") from err
