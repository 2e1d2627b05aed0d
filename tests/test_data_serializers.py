"""Serializers: built-in templates render listings and reviews as documented; HTML is stripped;
optional fields drop their line; required ones make the record bad; custom templates load."""

import pytest

from ellama_megatron.data.serializers import (
    MissingField,
    RecordSerializer,
    load_template,
    serialize,
    strip_html,
)

LISTING = {
    "title": "Acme Skillet 28 cm",
    "category_path": ["Home & Garden", "Kitchen", "Cookware"],
    "aspects": [
        {"name": "Brand", "value": "Acme"},
        {"name": "Material", "value": "Cast Iron"},
        {"name": "Size", "value": ""},
    ],
    "condition": "New",
    "description": (
        "<p>Pre-seasoned &amp; ready.</p><ul><li>Oven safe</li><li>Induction</li></ul><script>track()</script>"
    ),
    "language": "en",
}


def test_listing_template():
    text = serialize(LISTING, load_template("listing"))
    assert text == (
        "Title: Acme Skillet 28 cm\n"
        "Category: Home & Garden > Kitchen > Cookware\n"
        "Condition: New\n"
        "Brand: Acme\n"
        "Material: Cast Iron\n"
        "Description: Pre-seasoned & ready.\nOven safe\nInduction"
    )


def test_optional_field_missing_drops_its_line():
    rec = dict(LISTING)
    del rec["condition"]
    rec["aspects"] = {"Brand": "Acme", "Colour": ["Red", "Black"]}
    text = serialize(rec, load_template("listing"))
    assert "Condition" not in text
    assert "Brand: Acme\nColour: Red, Black" in text


def test_required_field_missing_or_empty_is_an_error():
    for rec in (
        {k: v for k, v in LISTING.items() if k != "title"},
        {**LISTING, "title": ""},
        {**LISTING, "title": None},
    ):
        with pytest.raises(MissingField, match="title"):
            serialize(rec, load_template("listing"))


def test_review_template_and_number_rendering():
    rec = {"product": "Acme Skillet", "rating": 4.0, "title": "Great", "text": "Heats <b>evenly</b>."}
    assert serialize(rec, load_template("review")) == (
        "Product: Acme Skillet\nRating: 4 out of 5\nReview title: Great\nHeats evenly."
    )


def test_plain_template_uses_text_key():
    # Text as given (issue 15 changed this from stripped): the ids are tokenizer(text), as Megatron-LM's tool writes.
    assert serialize({"content": "  hello world "}, load_template("plain", text_key="content")) == "  hello world "
    with pytest.raises(MissingField, match="content"):
        serialize({"text": "x"}, load_template("plain", text_key="content"))


def test_strip_html_keeps_plain_text_and_decodes_entities():
    assert strip_html("5 < 6 and 7 > 3") == "5 < 6 and 7 > 3"  # no tags: untouched
    assert strip_html("<div>a&nbsp;&nbsp;b</div><style>p{}</style><br>c &eacute;") == "a b\nc é"


def test_custom_template_file(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text('name: short\ntext: "{title} ({condition})"\nrequired: [title, condition]\n')
    tpl = load_template(str(path))
    assert serialize(LISTING, tpl) == "Acme Skillet 28 cm (New)"
    (tmp_path / "bad.yaml").write_text("txt: oops\n")
    with pytest.raises(ValueError, match="needs a 'text' key"):
        load_template(str(tmp_path / "bad.yaml"))
    with pytest.raises(ValueError, match="neither a built-in"):
        load_template("no_such_template")


def test_language_and_split_key():
    ser = RecordSerializer(load_template("listing"), id_key="id")
    assert ser.language({"language": "DE "}) == "de"
    assert ser.language({}) == "und"
    assert ser.split_key({"id": 7}, "text") == "id:7"
    assert ser.split_key({}, "text") == "text"


def test_plain_text_is_kept_byte_for_byte():
    text = "  Indented first line\n\n\tand a tab, blank lines and a trailing newline\n\n"
    assert serialize({"text": text}, load_template("plain")) == text


def test_whitespace_normalisation_is_an_explicit_template_option(tmp_path):
    spec = tmp_path / "note.yaml"
    spec.write_text('text: "Note: {note}\\n{body}"\nnormalize_whitespace: true\n')
    record = {"note": "  padded  ", "body": "\n body \n"}
    assert serialize(record, load_template(str(spec))) == "Note: padded\nbody"
    spec.write_text('text: "Note: {note}\\n{body}"\n')  # default: as given
    assert serialize(record, load_template(str(spec))) == "Note:   padded  \n\n body \n"
    assert load_template("listing").normalize_whitespace and not load_template("plain").normalize_whitespace
    spec.write_text('text: "{body}"\nnormalize_whitespace: maybe\n')
    with pytest.raises(ValueError, match="normalize_whitespace='maybe' must be true or false"):
        load_template(str(spec))
