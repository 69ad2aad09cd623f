"""The GLM vocabulary: BPE tokens, token types, merges, special token ids and chat template.

Mirrors llama.cpp's ``TextModel.get_vocab_base`` + ``gguf.SpecialVocab`` (the pinned tree's
version, which differs from PyPI gguf 0.19's) + the GLM-specific overrides of
``Glm4Model.set_vocab`` (glm4v) and ``TextModel._set_vocab_glm`` (glm4v_moe), reading
``tokenizer.json`` / ``tokenizer_config.json`` directly instead of through
``transformers.AutoTokenizer``. Two consequences, both no-ops for GLM tokenizers:

* added tokens that are not ``normalized`` are taken verbatim; the reference round-trips them
  through ``decode(encode(token))``, which returns the same text for GLM's added tokens;
* the pre-tokenizer is written as ``glm4`` without hashing a test string through the tokenizer
  (the reference's hash table recognises GLM-4's tokenizer as ``glm4``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConversionError
from ._config import ModelConfig, load_json

__all__ = ["Vocab", "load_vocab"]

# gguf.TokenType
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# SpecialVocab type -> GGUF key (types without a GGUFWriter handler are dropped, as by the reference)
_ID_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "sep": "tokenizer.ggml.seperator_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
    "mask": "tokenizer.ggml.mask_token_id",
    "eot": "tokenizer.ggml.eot_token_id",
    "eom": "tokenizer.ggml.eom_token_id",
}
_ADD_KEYS = {
    "bos": "tokenizer.ggml.add_bos_token",
    "eos": "tokenizer.ggml.add_eos_token",
    "sep": "tokenizer.ggml.add_sep_token",
}


@dataclass
class SpecialVocab:
    """Port of the pinned tree's ``gguf.vocab.SpecialVocab`` (load_merges=True, n_vocab=None)."""

    merges: list[str] = field(default_factory=list)
    special_token_ids: dict[str, int] = field(default_factory=dict)
    add_special_token: dict[str, bool] = field(default_factory=dict)
    chat_template: Any = None
    normalizer_lowercase: bool | None = None
    normalizer_strip_accents: bool | None = None
    special_token_types: tuple[str, ...] = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")

    def set_special_token(self, typ: str, tid: Any) -> None:
        if not isinstance(tid, int) or isinstance(tid, bool):
            return
        if tid < 0:
            raise ConversionError(f"invalid value for special token type {typ}: {tid}")
        if typ not in self.special_token_ids:
            self.special_token_ids[typ] = tid

    def _parse_normalizer(self, normalizer: dict) -> None:
        kind = normalizer.get("type")
        if kind == "Lowercase":
            self.normalizer_lowercase = True
        elif kind == "StripAccents":
            self.normalizer_strip_accents = True
        elif kind == "BertNormalizer":
            if "lowercase" in normalizer:
                self.normalizer_lowercase = normalizer["lowercase"]
            if "strip_accents" in normalizer:
                self.normalizer_strip_accents = normalizer["strip_accents"]
        elif kind == "Sequence":
            for n in normalizer.get("normalizers", []):
                self._parse_normalizer(n)

    def load(self, path: Path, tokenizer: dict, tokenizer_config: dict | None, config: dict) -> None:
        self._load_merges(tokenizer, path)
        if normalizer := tokenizer.get("normalizer"):
            self._parse_normalizer(normalizer)
        added_tokens = tokenizer.get("added_tokens", {})
        self._load_tokenizer_config(path, tokenizer, tokenizer_config, added_tokens)
        for typ in self.special_token_types:
            token_id = config.get(f"{typ}_token_id")
            if token_id is None and "text_config" in config:
                token_id = config["text_config"].get(f"{typ}_token_id")
            self.set_special_token(typ, token_id)

    def _load_merges(self, tokenizer: dict, path: Path) -> None:
        merges = tokenizer.get("model", {}).get("merges")
        if not isinstance(merges, list) or not merges:
            self._load_merges_txt(path / "merges.txt")
            return
        if isinstance(merges[0], str):
            self.merges = list(merges)
        elif isinstance(merges[0], list) and len(merges[0]) == 2 and isinstance(merges[0][0], str):
            self.merges = [
                " ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
                for pair in merges
            ]
        else:
            raise ConversionError(f"{path / 'tokenizer.json'}: unknown tokenizer merges format")

    def _load_merges_txt(self, merges_file: Path) -> None:
        if not merges_file.is_file():
            return
        lines = merges_file.read_text(encoding="utf-8").splitlines()
        if lines and lines[0].strip().startswith("#"):
            lines = lines[1:]
        for line in lines:
            parts = line.strip().split(None, 3)
            if len(parts) == 2:
                self.merges.append(f"{parts[0]} {parts[1]}")

    def _load_tokenizer_config(
        self, path: Path, tokenizer: dict, tc: dict | None, added_tokens: list
    ) -> None:
        special_bos = (tc or {}).get("bos_token")
        special_cls = (tc or {}).get("cls_token")
        special_eos = (tc or {}).get("eos_token")
        special_sep = (tc or {}).get("sep_token")
        if not special_bos and special_cls and tc:
            tc["bos_token"] = special_bos = special_cls
        if not special_eos and special_sep and tc:
            tc["eos_token"] = special_eos = special_sep
        if post_processor := tokenizer.get("post_processor"):
            for processor in post_processor.get("processors", [post_processor]):
                kind = processor.get("type")
                if kind == "ByteLevel":
                    self.add_special_token.setdefault("bos", False)
                    self.add_special_token.setdefault("eos", False)
                elif kind == "RobertaProcessing":
                    self.add_special_token["bos"] = True
                    self.add_special_token["eos"] = True
                    self.add_special_token["sep"] = True
                    if not special_cls and tc:
                        special_cls = processor.get("cls", [special_bos])[0]
                        tc["cls_token"] = special_cls
                    if not special_sep and tc:
                        special_sep = processor.get("sep", [special_eos])[0]
                        tc["sep_token"] = special_sep
                    continue
                elif kind == "TemplateProcessing":
                    special_bos, special_cls, special_eos, special_sep = self._template_processing(
                        processor, tc, special_bos, special_cls, special_eos, special_sep
                    )
                    continue
        if not tc:
            return
        alt: Any = None
        jinja = path / "chat_template.jinja"
        cjson = path / "chat_template.json"
        if jinja.is_file():
            alt = jinja.read_text(encoding="utf-8")
            extra = sorted((path / "additional_chat_templates").glob("*.jinja"))
            if extra:
                alt = [{"name": "default", "template": alt}]
                alt += [{"name": p.stem, "template": p.read_text(encoding="utf-8")} for p in extra]
        elif cjson.is_file():
            data = load_json(cjson)
            alt = data.get("chat_template") if isinstance(data, dict) else None
        chat_template = tc.get("chat_template", alt)
        if chat_template is None or isinstance(chat_template, (str, list)):
            self.chat_template = chat_template
        for typ in self.special_token_types:
            add_entry = tc.get(f"add_{typ}_token")
            if isinstance(add_entry, bool) and typ not in self.add_special_token:
                self.add_special_token[typ] = add_entry
            entry = tc.get(f"{typ}_token")
            if isinstance(entry, str):
                content = entry
            elif isinstance(entry, dict) and isinstance(entry.get("content"), str):
                content = entry["content"]
            else:
                continue
            tid = next((t.get("id") for t in added_tokens if t.get("content") == content), None)
            self.set_special_token(typ, tid)

    def _template_processing(self, processor, tc, special_bos, special_cls, special_eos, special_sep):
        single = processor.get("single", [])
        pair = processor.get("pair", [])
        special_first = special_last = None
        if len(single) > 1:
            if special_first := single[0].get("SpecialToken", {}).get("id"):
                if not tc:
                    special_bos = special_first
                elif special_first not in (special_bos, special_cls):
                    if not special_bos:
                        tc["bos_token"] = special_bos = special_first
                    if not special_cls:
                        tc["cls_token"] = special_cls = special_first
                self.add_special_token["bos"] = special_first in (special_bos, special_cls)
            if special_last := single[-1].get("SpecialToken", {}).get("id"):
                if not tc:
                    special_eos = special_last
                elif special_last != special_eos:
                    if "eot" not in self.special_token_types:
                        self.special_token_types = (*self.special_token_types, "eot")
                        tc["eot_token"] = special_eos
                    elif "eom" not in self.special_token_types:
                        self.special_token_types = (*self.special_token_types, "eom")
                        tc["eom_token"] = special_eos
                    tc["eos_token"] = special_eos = special_last
                self.add_special_token["eos"] = special_last == special_eos
        if pair:
            start = 1 if special_first and pair[0].get("SpecialToken", {}).get("id") == special_first else 0
            stop = -1 if special_last and pair[-1].get("SpecialToken", {}).get("id") == special_last else None
            pair = pair[slice(start, stop)]
            if pair:
                a = pair[0].get("Sequence", {}).get("id")
                b = pair[-1].get("Sequence", {}).get("id")
                if a == "A" and b == "B" and (pair := pair[1:-1]):
                    add_sep = False
                    if entry := pair[0].get("SpecialToken", {}).get("id"):
                        if entry in (special_sep, special_eos) and not special_last:
                            add_sep = True
                    if len(pair) == 2:
                        if entry := pair[1].get("SpecialToken", {}).get("id"):
                            if entry in (special_sep, special_eos):
                                add_sep = True
                    self.add_special_token["sep"] = add_sep
                    if add_sep and not special_sep and tc:
                        tc["sep_token"] = special_eos
        return special_bos, special_cls, special_eos, special_sep

    def kv(self) -> list[tuple[str, str, Any]]:
        """(key, kind, value) entries in the order ``SpecialVocab.add_to_gguf`` writes them."""
        out: list[tuple[str, str, Any]] = []
        if self.merges:
            out.append(("tokenizer.ggml.merges", "array", self.merges))
        for typ, tid in self.special_token_ids.items():
            if typ in _ID_KEYS:
                out.append((_ID_KEYS[typ], "u32", tid))
        for typ, value in self.add_special_token.items():
            if typ in _ADD_KEYS:
                out.append((_ADD_KEYS[typ], "bool", value))
        if self.chat_template is not None:
            out.extend(_chat_template_kv(self.chat_template))
        if self.normalizer_lowercase is not None:
            out.append(("tokenizer.ggml.normalizer.lowercase", "bool", self.normalizer_lowercase))
        if self.normalizer_strip_accents is not None:
            out.append(("tokenizer.ggml.normalizer.strip_accents", "bool", self.normalizer_strip_accents))
        return out


def _chat_template_kv(value: Any) -> list[tuple[str, str, Any]]:
    """GGUFWriter.add_chat_template: a string, or a list of named templates."""
    if isinstance(value, str):
        return [("tokenizer.chat_template", "str", value)]
    out: list[tuple[str, str, Any]] = []
    default = None
    names: dict[str, None] = {}
    for choice in value:
        name = "".join(c if c.isascii() and c.isalnum() else "_" for c in choice.get("name", ""))
        template = choice.get("template")
        if name and template is not None:
            if name == "default":
                default = template
            else:
                names[name] = None
                out.append((f"tokenizer.chat_template.{name}", "str", template))
    if names:
        out.append(("tokenizer.chat_templates", "array", list(names)))
    if default is not None:
        out.append(("tokenizer.chat_template", "str", default))
    return out


def _looks_special(token: str) -> bool:
    """TextModel.does_token_look_special."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


@dataclass
class Vocab:
    tokens: list[str]
    token_types: list[int]
    special: SpecialVocab

    def kv(self) -> list[tuple[str, str, Any]]:
        return [
            ("tokenizer.ggml.model", "str", "gpt2"),
            ("tokenizer.ggml.pre", "str", "glm4"),
            ("tokenizer.ggml.tokens", "array", self.tokens),
            ("tokenizer.ggml.token_type", "array", self.token_types),
            *self.special.kv(),
        ]


def load_vocab(cfg: ModelConfig) -> Vocab:
    """Build the GGUF vocabulary of the checkpoint in ``cfg.hf_dir``."""
    path = cfg.hf_dir
    tok_path = path / "tokenizer.json"
    if not tok_path.is_file():
        raise ConversionError(f"{tok_path}: file not found (a fast tokenizer is required)")
    tokenizer = load_json(tok_path)
    model = tokenizer.get("model") if isinstance(tokenizer, dict) else None
    if (
        not isinstance(model, dict)
        or model.get("type", "BPE") != "BPE"
        or not isinstance(model.get("vocab"), dict)
    ):
        raise ConversionError(f"{tok_path}: expected a byte-level BPE tokenizer with a 'model.vocab' table")
    tc = load_json(path / "tokenizer_config.json", required=False)
    if tc is not None and not isinstance(tc, dict):
        raise ConversionError(f"{path / 'tokenizer_config.json'}: expected a JSON object")

    vocab: dict[str, int] = {str(k): int(v) for k, v in model["vocab"].items()}
    added: dict[int, dict] = {}
    for t in tokenizer.get("added_tokens", []):
        vocab[str(t["content"])] = int(t["id"])
        added[int(t["id"])] = t
    added_contents = {str(t["content"]) for t in added.values()}

    vocab_size = cfg.text.get("vocab_size", len(vocab))
    if vocab and max(vocab.values()) >= vocab_size:
        raise ConversionError(
            f"{tok_path}: token id {max(vocab.values())} does not fit the model's vocab_size {vocab_size} "
            f"({cfg.hf_dir / 'config.json'})"
        )
    reverse = {i: t for t, i in vocab.items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        if token in added_contents and i in added:
            if added[i].get("special", False) or _looks_special(token):
                types.append(CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(token)

    special = SpecialVocab()
    special.load(path, tokenizer, dict(tc) if tc else tc, cfg.raw)

    def added_id(content: str) -> int:
        for i, t in added.items():
            if t.get("content") == content:
                return i
        raise ConversionError(f"{tok_path}: GLM special token {content!r} is missing from the added tokens")

    if cfg.is_moe:  # TextModel._set_vocab_glm
        special.set_special_token("bos", added_id("[gMASK]"))
        special.set_special_token("eot", added_id("<|user|>"))
        special.set_special_token("unk", added_id("<|endoftext|>"))
        special.set_special_token("eom", added_id("<|observation|>"))
    else:  # Glm4Model.set_vocab
        special.set_special_token("eos", added_id("<|endoftext|>"))
        special.set_special_token("eot", added_id("<|user|>"))
        special.set_special_token("unk", added_id("<|endoftext|>"))
        special.set_special_token("bos", added_id("<|endoftext|>"))
    return Vocab(tokens, types, special)
