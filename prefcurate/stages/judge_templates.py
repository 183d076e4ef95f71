"""Judge prompts and the parsing of judge answers.

Two built-in methods:

- ``pairwise``: both responses in one prompt, labelled A and B; the judge names the better
  one or a tie. The stage asks in both orders (position swap) to cancel position bias.
- ``rating``: each response alone, rated 1-10 on rubric aspects (by default UltraFeedback's
  helpfulness, honesty, instruction following, truthfulness); the pair's verdict comes from
  the difference of the mean ratings. One response per request means a response shared by
  several pairs is rated once (the cache sees the same request), and there is no position.

A user template (Jinja2, sandboxed, undefined variables are errors) replaces the pairwise
prompt; it sees ``prompt`` (the conversation as a transcript), ``response_a``,
``response_b`` and ``prompt_messages`` (the list of {role, content}).

Verdicts are read from JSON when the answer is JSON (``verdict``/``winner``/``better``/
``preference``/``choice``/``answer`` keys), else by three patterns (A, B, tie) a user can
set so that a prompt from a paper can be used as written. When several patterns match, the
one matching last in the answer wins: judges reason first and conclude at the end.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefcurate.errors import ConfigError

DEFAULT_ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")
ASPECT_HELP = {
    "helpfulness": "does it address the request usefully, with the right amount of detail",
    "honesty": "does it express uncertainty where it should and avoid overclaiming",
    "instruction_following": "does it do what was asked, respecting every stated constraint",
    "truthfulness": "are its statements factually correct, free of invented details",
    "harmlessness": "does it avoid content that could cause harm",
}
DEFAULT_PATTERNS = {"A": r"\[\[\s*A\s*\]\]", "B": r"\[\[\s*B\s*\]\]", "tie": r"(?i)\[\[\s*(?:C|tie)\s*\]\]"}
VERDICT_KEYS = ("verdict", "winner", "better", "preference", "choice", "answer")
RATIONALE_KEYS = ("reasoning", "rationale", "explanation", "reason")
SCALE = (1.0, 10.0)

PAIRWISE_SYSTEM = (
    "You are an impartial judge of AI assistant responses. Given a conversation and two candidate "
    "responses to its last turn, decide which response serves the user better: it follows the "
    "instructions, is correct, helpful and harmless. The order of the responses and their length "
    "are not merits; judge the content only."
)
RATING_SYSTEM = (
    "You are a careful evaluator of AI assistant responses. Rate the response to the last turn of "
    "the conversation on each aspect you are given, on a scale from 1 (very poor) to 10 (excellent)."
)

_PAIRWISE = """\
[Conversation]
{{ prompt }}

[Response A]
{{ response_a }}
[End of Response A]

[Response B]
{{ response_b }}
[End of Response B]

{{ instruction }}"""

_RATING = """\
[Conversation]
{{ prompt }}

[Response]
{{ response }}
[End of Response]

Aspects:
{% for name, text in aspects %}- {{ name }}{% if text %}: {{ text }}{% endif %}
{% endfor %}
{{ instruction }}"""

_VERDICT_TEXT = "[[A]] if Response A is better, [[B]] if Response B is better, [[C]] for a tie"


def pairwise_instruction(json_mode: bool, rationale: bool) -> str:
    if json_mode:
        fields = '"reasoning": "<one or two sentences>", ' if rationale else ""
        return f'Reply with a JSON object only: {{{fields}"verdict": "A" or "B" or "tie"}}.'
    if rationale:
        return f"Explain your comparison in one or two sentences, then end with your verdict: {_VERDICT_TEXT}."
    return f"Reply with your verdict only: {_VERDICT_TEXT}."


def rating_instruction(json_mode: bool, aspects: tuple[str, ...]) -> str:
    if json_mode:
        example = json.dumps({a: 7 for a in aspects})
        return f"Reply with a JSON object only, one integer rating per aspect: {example}."
    return f"Reply with one line per aspect, in the form `aspect: rating`, e.g. `{aspects[0]}: 7`."


def _environment() -> Any:
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    return SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=False, autoescape=False)


def load_user_template(path: Path) -> Any:
    """Compile a user's pairwise template; it must use ``response_a`` and ``response_b``."""
    from jinja2 import TemplateSyntaxError, meta

    try:
        source = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"template {path}: {exc.strerror}", "give a readable Jinja2 file") from None
    env = _environment()
    try:
        names = meta.find_undeclared_variables(env.parse(source))
        template = env.from_string(source)
    except TemplateSyntaxError as exc:
        raise ConfigError(f"template {path} line {exc.lineno}: {exc.message}", "fix the Jinja2 syntax") from None
    missing = {"response_a", "response_b"} - names
    if missing:
        raise ConfigError(
            f"template {path} does not use {', '.join(sorted(missing))}",
            "a pairwise template shows both responses: {{ response_a }} and {{ response_b }}",
        )
    unknown = names - {"prompt", "response_a", "response_b", "prompt_messages"}
    if unknown:
        raise ConfigError(
            f"template {path} uses unknown variable(s) {', '.join(sorted(unknown))}",
            "available: prompt, response_a, response_b, prompt_messages",
        )
    return template


@dataclass
class Patterns:
    """Compiled verdict patterns, label -> regex."""

    regexes: dict[str, re.Pattern[str]]

    @classmethod
    def build(cls, a: str | None, b: str | None, tie: str | None) -> Patterns:
        given = {"A": a, "B": b, "tie": tie}
        out = {}
        for label, pattern in given.items():
            source = pattern if pattern is not None else DEFAULT_PATTERNS[label]
            try:
                out[label] = re.compile(source, re.MULTILINE)
            except re.error as exc:
                raise ConfigError(f"verdict pattern for {label} {source!r}: {exc}", "give a Python regex") from None
        return cls(out)

    def match(self, text: str) -> str | None:
        """The label whose pattern matches last in ``text``; None when none matches."""
        best, best_end = None, -1
        for label, regex in self.regexes.items():
            ends = [m.end() for m in regex.finditer(text)]
            if ends and ends[-1] > best_end:
                best, best_end = label, ends[-1]
        return best


def extract_json(text: str) -> Any:
    """The JSON object in an answer: bare, fenced, or among prose; the last top-level one when
    there are several (judges conclude at the end); None if there is none."""
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    decoder = json.JSONDecoder()
    found, start = None, text.find("{")
    while start >= 0:
        try:
            found, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            end = start + 1
        start = text.find("{", end)
    return found


_LABEL = re.compile(r"^(?:response|output|assistant|answer|model)?\s*[\(\[]*\s*([abc12])\s*[\)\]]*\.?$")
_TIE_WORDS = {"tie", "equal", "draw", "both", "neither", "same", "none"}


def normalise_label(value: Any) -> str | None:
    """``"A"``, ``"Response B"``, ``"(a)"``, ``1``, ``"tie"`` ... -> "A" / "B" / "tie"."""
    text = str(value).strip().lower()
    if text in _TIE_WORDS:
        return "tie"
    m = _LABEL.match(text)
    if not m:
        return None
    return {"a": "A", "1": "A", "b": "B", "2": "B", "c": "tie"}[m.group(1)]


def _field(data: dict[str, Any], keys: tuple[str, ...]) -> Any:
    lowered = {str(k).lower(): v for k, v in data.items()}
    return next((lowered[k] for k in keys if k in lowered), None)


def parse_verdict(text: str, patterns: Patterns) -> tuple[str | None, str]:
    """(label or None, rationale): JSON first, then the patterns."""
    data = extract_json(text)
    if isinstance(data, dict):
        label = normalise_label(_field(data, VERDICT_KEYS)) if _field(data, VERDICT_KEYS) is not None else None
        if label is not None:
            rationale = _field(data, RATIONALE_KEYS)
            return label, str(rationale) if rationale is not None else text
    return patterns.match(text), text


def _aspect_regex(name: str) -> re.Pattern[str]:
    words = [re.escape(w) for w in re.split(r"[_\s-]+", name) if w]
    return re.compile(r"[\s_-]*".join(words) + r"\W{0,5}?(\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_ratings(text: str, aspects: tuple[str, ...]) -> dict[str, float] | None:
    """One rating per aspect, each within 1-10, from JSON or ``aspect: n`` lines; None otherwise."""
    data = extract_json(text)
    found: dict[str, float] = {}
    if isinstance(data, dict):
        flat = {re.sub(r"[\s_-]+", "_", str(k).lower()): v for k, v in data.items()}
        for name in aspects:
            value = flat.get(re.sub(r"[\s_-]+", "_", name.lower()))
            if isinstance(value, dict):
                value = _field(value, ("rating", "score"))
            try:
                found[name] = float(value)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                pass
    for name in aspects:
        if name not in found:
            m = _aspect_regex(name).search(text)
            if m:
                found[name] = float(m.group(1))
    if len(found) != len(aspects) or not all(SCALE[0] <= v <= SCALE[1] for v in found.values()):
        return None
    return found


@dataclass
class Prompts:
    """Renders the messages of each request."""

    method: str
    json_mode: bool
    rationale: bool
    aspects: tuple[str, ...]
    system: str | None = None
    user_template: Any = None

    def __post_init__(self) -> None:
        env = _environment()
        self._pairwise = env.from_string(_PAIRWISE)
        self._rating = env.from_string(_RATING)

    def pairwise(self, prompt: list[dict[str, str]], response_a: str, response_b: str) -> list[dict[str, str]]:
        from prefcurate.schema import render_transcript

        values = {"prompt": render_transcript(prompt), "response_a": response_a, "response_b": response_b}
        if self.user_template is not None:
            try:
                text = self.user_template.render(**values, prompt_messages=prompt)
            except Exception as exc:  # jinja2's UndefinedError, SecurityError, the template's own 1/0
                raise ConfigError(
                    f"--template: rendering a pair failed ({type(exc).__name__}: {exc})",
                    "make the template work for every pair, e.g. {% if prompt_messages %} for an empty prompt",
                ) from None
            return self._messages(self.system, text)
        text = self._pairwise.render(**values, instruction=pairwise_instruction(self.json_mode, self.rationale))
        return self._messages(self.system or PAIRWISE_SYSTEM, text)

    def rating(self, prompt: list[dict[str, str]], response: str) -> list[dict[str, str]]:
        from prefcurate.schema import render_transcript

        aspects = [(a, ASPECT_HELP.get(a, "")) for a in self.aspects]
        text = self._rating.render(
            prompt=render_transcript(prompt),
            response=response,
            aspects=aspects,
            instruction=rating_instruction(self.json_mode, self.aspects),
        )
        return self._messages(self.system or RATING_SYSTEM, text)

    @staticmethod
    def _messages(system: str | None, user: str) -> list[dict[str, str]]:
        head = [{"role": "system", "content": system}] if system else []
        return [*head, {"role": "user", "content": user}]

    def json_schema(self) -> dict[str, Any]:
        """A strict JSON schema for ``response_format: json_schema`` (OpenAI, vLLM)."""
        if self.method == "rating":
            props: dict[str, Any] = {a: {"type": "integer"} for a in self.aspects}
        else:
            props = {"verdict": {"type": "string", "enum": ["A", "B", "tie"]}}
            if self.rationale:
                props = {"reasoning": {"type": "string"}, **props}
        schema = {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}
        return {"name": f"judge_{self.method}", "strict": True, "schema": schema}
