"""Structured records -> training text, through a configurable template.

A template is text with ``{field}`` placeholders naming record keys, one statement per line.
A line whose placeholders are all present is kept; a line with a missing *optional* field is
dropped (a listing without a condition simply has no "Condition:" line); a missing *required*
field makes the record bad (counted, reported, skipped). Values are rendered by type:
lists of strings as a path ("Home > Kitchen > Knives"), name/value pairs (a list of
{"name", "value"} objects or a mapping) as one "name: value" line each, numbers without a
spurious ".0", and fields listed in ``html_fields`` with their HTML stripped.

Text is kept as given unless the template asks otherwise: the ``plain`` template writes a record's
text byte for byte (the ids equal ``tokenizer(text).input_ids``, as Megatron-LM's
tools/preprocess_data.py writes them; leading spaces and trailing newlines are tokens too).
``normalize_whitespace: true`` (the built-in listing and review templates, which assemble a document
from fields) strips each value and the document, and drops lines left blank.

The built-in templates are a guess at a good serialization (the paper's format is not public);
pass ``--template my_template.yaml`` to use your own (keys: text, required, html_fields).
"""

from __future__ import annotations

import functools
import html
import re
import string
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path


class MissingField(ValueError):
    """A required template field is absent or empty in a record."""


@dataclass(frozen=True)
class Template:
    name: str
    text: str  # lines with {field} placeholders
    required: tuple[str, ...] = ()  # fields a record must have
    html_fields: tuple[str, ...] = ()  # fields whose HTML is stripped
    normalize_whitespace: bool = False  # strip each value and the document; False: text as given

    def fields(self) -> list[str]:
        return [f for _, f, _, _ in string.Formatter().parse(self.text) if f]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "text": self.text,
            "required": list(self.required),
            "html_fields": list(self.html_fields),
            "normalize_whitespace": self.normalize_whitespace,
        }


BUILTIN_TEMPLATES = {
    "listing": Template(
        name="listing",
        text=(
            "Title: {title}\nCategory: {category_path}\nCondition: {condition}\n{aspects}\nDescription: {description}"
        ),
        required=("title",),
        html_fields=("description",),
        normalize_whitespace=True,  # fields of a listing, not prose: their padding carries nothing
    ),
    "review": Template(
        name="review",
        text=("Product: {product}\nRating: {rating} out of 5\nReview title: {title}\n{text}"),
        required=("product", "text"),
        html_fields=("text",),
        normalize_whitespace=True,
    ),
    "plain": Template(name="plain", text="{text}", required=("text",)),
}


def plain_template(text_key: str) -> Template:
    """General-domain text stored under ``text_key``, used as is (no whitespace is touched)."""
    return Template(name="plain", text="{" + text_key + "}", required=(text_key,))


def load_template(name_or_path: str, text_key: str = "text") -> Template:
    """A built-in template by name (listing, review, plain) or a YAML/JSON file describing one."""
    if name_or_path == "plain":
        return plain_template(text_key)
    if name_or_path in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"template {name_or_path!r}: neither a built-in ({', '.join(BUILTIN_TEMPLATES)}) nor a file")
    import yaml

    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict) or not isinstance(spec.get("text"), str):
        raise ValueError(f"{path}: a template file needs a 'text' key holding the template string")
    unknown = set(spec) - {"name", "text", "required", "html_fields", "normalize_whitespace"}
    if unknown:
        raise ValueError(
            f"{path}: unknown template keys {sorted(unknown)} "
            "(allowed: name, text, required, html_fields, normalize_whitespace)"
        )
    if not isinstance(spec.get("normalize_whitespace", False), bool):
        raise ValueError(f"{path}: normalize_whitespace={spec['normalize_whitespace']!r} must be true or false")
    return Template(
        name=str(spec.get("name", path.stem)),
        text=spec["text"],
        required=tuple(spec.get("required", ()) or ()),
        html_fields=tuple(spec.get("html_fields", ()) or ()),
        normalize_whitespace=spec.get("normalize_whitespace", False),
    )


class _TextExtractor(HTMLParser):
    # Tags that end a visual line: their text must not run into the next block's.
    BLOCK = {"p", "br", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "table", "section"}
    HIDDEN = {"script", "style", "head", "title", "noscript"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.HIDDEN:
            self.hidden += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.hidden:
            self.parts.append(data)


_SPACES = re.compile(r"[ \t\r\f\v\u00a0]+")
_NEWLINES = re.compile(r"\n\s*\n+")
_LOOKS_LIKE_HTML = re.compile(r"<[a-zA-Z/!]|&[#a-zA-Z0-9]+;")


def strip_html(text: str) -> str:
    """Visible text of an HTML fragment: tags, scripts and styles removed, entities decoded,
    block elements on their own lines, runs of spaces collapsed."""
    if not _LOOKS_LIKE_HTML.search(text):
        return text.strip()
    parser = _TextExtractor()
    parser.feed(text)
    parser.close()
    out = html.unescape("".join(parser.parts))
    lines = (_SPACES.sub(" ", line).strip() for line in out.split("\n"))
    return _NEWLINES.sub("\n", "\n".join(line for line in lines if line)).strip()


def _is_empty(value) -> bool:
    return value is None or (isinstance(value, (str, list, dict)) and len(value) == 0)


def _render_scalar(value, normalize: bool = True) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip() if normalize else str(value)


def _render_pairs(pairs) -> str:
    lines = []
    for name, value in pairs:
        if _is_empty(name) or _is_empty(value):
            continue
        if isinstance(value, list):
            value = ", ".join(_render_scalar(v) for v in value if not _is_empty(v))
        lines.append(f"{_render_scalar(name)}: {_render_scalar(value)}")
    return "\n".join(lines)


def render_value(value, strip: bool = False, normalize_whitespace: bool = True) -> str:
    """A record value as text (see the module docstring for the rules)."""
    if isinstance(value, dict):
        return _render_pairs(value.items())
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            return _render_pairs((v.get("name", v.get("key")), v.get("value", v.get("values"))) for v in value)
        return " > ".join(_render_scalar(v) for v in value if not _is_empty(v))
    text = _render_scalar(value, normalize_whitespace)
    return strip_html(text) if strip else text


@functools.lru_cache(maxsize=64)
def _template_lines(template: Template) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Each line of the template with the fields it names: parsed once, not once per record."""
    return tuple(
        (line, tuple(f for _, f, _, _ in string.Formatter().parse(line) if f)) for line in template.text.split("\n")
    )


def text_as_given_key(template: Template) -> str | None:
    """The record key of a template that is one required field written as given (``plain``): a
    record whose value there is a non-blank string serializes to that string itself, which callers
    on the hot path take without ``serialize``. None for any other template."""
    if template.normalize_whitespace or template.html_fields or len(template.required) != 1:
        return None
    key = template.required[0]
    return key if template.text == "{" + key + "}" else None


def serialize(record: dict, template: Template) -> str:
    """The record's training text; raises MissingField when a required field is absent or empty."""
    rendered: dict[str, str] = {}
    for name in template.required:
        if _is_empty(record.get(name)):
            raise MissingField(name)
    out_lines = []
    for line, names in _template_lines(template):
        keep = True
        for name in names:
            if name not in rendered:
                value = record.get(name)
                rendered[name] = (
                    ""
                    if _is_empty(value)
                    else render_value(value, name in template.html_fields, template.normalize_whitespace)
                )
            if not rendered[name].strip():  # only whitespace: absent, as an empty string
                if name in template.required:
                    raise MissingField(name)
                keep = False
        if keep:
            text = line.format_map(rendered)
            if text.strip() or not template.normalize_whitespace:
                out_lines.append(text)
    text = "\n".join(out_lines)
    return text.strip() if template.normalize_whitespace else text


@dataclass
class RecordSerializer:
    """Template plus the record keys that carry language and identity."""

    template: Template
    language_key: str = "language"  # record key holding a language code, when present
    default_language: str = "und"  # language recorded when the key is absent ("und": undetermined)
    id_key: str | None = None  # record key identifying a document (validation split); None: its text

    def language(self, record: dict) -> str:
        value = record.get(self.language_key)
        return str(value).strip().lower() if not _is_empty(value) else self.default_language

    def split_key(self, record: dict, text: str) -> str:
        if self.id_key is not None and not _is_empty(record.get(self.id_key)):
            return f"id:{record[self.id_key]}"
        return text
