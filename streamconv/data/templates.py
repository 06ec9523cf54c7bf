"""Prompt templates of the instruction handler, as data (MindSpeed-LLM ``configs/finetune/templates.json``,
LLaMA-Factory's formatter model).

A conversation is a list of (user, assistant) turns plus an optional system text.  Each message is encoded to
ids separately (strings with ``add_special_tokens=False``; an empty string gives no ids):

    turn 0 source  = [BOS if prefix_bos] + ids(system.format(system text), if any) + ids(user.format(q0))
    turn t source  = ids(separator) + ids(user.format(qt))                      (t > 0)
    every target   = ids(assistant.format(a)) + [EOS if assistant_eos]

``{{content}}`` in a format string is replaced by the message text (first occurrence, as the reference does).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ValidationError

PLACEHOLDER = "{{content}}"


@dataclass(frozen=True)
class Template:
    name: str
    user: str
    assistant: str = PLACEHOLDER
    system: str = PLACEHOLDER
    separator: str = ""
    prefix_bos: bool = True
    assistant_eos: bool = True
    default_system: str = ""


TEMPLATES: dict[str, Template] = {
    # format_user "<｜User｜>{{content}}<｜Assistant｜>", format_prefix [bos_token], efficient_eos false
    "deepseek3": Template("deepseek3", user="<｜User｜>" + PLACEHOLDER + "<｜Assistant｜>"),
}


def fill(fmt: str, content: str) -> str:
    return fmt.replace(PLACEHOLDER, content, 1)


def get_template(name: str | None) -> Template:
    if name is None:
        raise ValidationError(f"--prompt-type is required with --handler-name AlpacaStyleInstructionHandler "
                              f"(known: {', '.join(sorted(TEMPLATES))}).")
    key = name.strip()
    if key not in TEMPLATES:
        raise ValidationError(f"--prompt-type {name!r}: unknown prompt type (known: {', '.join(sorted(TEMPLATES))}). "
                              f"Pass one of them.")
    return TEMPLATES[key]
