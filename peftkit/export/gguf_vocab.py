"""A transformers BPE tokenizer as GGUF tokenizer metadata (llama.cpp's key names).

Two kinds are written: byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM; `tokenizer.ggml.model`
"gpt2") and sentencepiece-style BPE with byte fallback (Gemma, Phi-3, Llama 2; "llama").

GGUF has no `tokenizer.json`: readers (llama.cpp, transformers' GGUF loader) rebuild the tokenizer
from the vocabulary, the merges, the token types, the special token ids and one *name* for the
pre-tokenizer (`tokenizer.ggml.pre`), which selects the regex that splits text before BPE runs.
So the name must be derived from the tokenizer's own pre-tokenizer, never guessed: a wrong one
tokenizes differently without any error.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import gguf

from peftkit.errors import UnsupportedGGUFExport

# Split regexes of the pre-tokenizers we recognise, by the name llama.cpp gives them. The strings are
# those of the original tokenizer.json files (transformers' GGUF reader maps the same names back to
# the same regexes).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_NAMES = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
# Normalizers that readers may ignore: NFC only changes text that is not already NFC (Qwen2 has it).
HARMLESS_NORMALIZERS = (None, "NFC")
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


@dataclass
class GGUFVocab:
    """Everything `tokenizer.*` in a GGUF file says, ready to write."""

    pre: str | None
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    model: str = "gpt2"
    """llama.cpp's name: "gpt2" = byte-level BPE, "llama" = sentencepiece-style."""
    scores: list[float] | None = None
    """sentencepiece only: llama.cpp merges the adjacent pair whose result scores highest."""
    add_space_prefix: bool | None = None
    special_ids: dict[str, int] = field(default_factory=dict)  # bos / eos / unk / pad / eot
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.token_types)
        # sentencepiece files need no merges for llama.cpp (it merges by score), but with them
        # transformers' reader rebuilds exactly these merges instead of guessing them.
        writer.add_token_merges(self.merges)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        adders = {
            "bos": writer.add_bos_token_id,
            "eos": writer.add_eos_token_id,
            "unk": writer.add_unk_token_id,
            "pad": writer.add_pad_token_id,
            "eot": writer.add_eot_token_id,
        }
        for kind, token_id in self.special_ids.items():
            adders[kind](token_id)
        # Written even when False: llama.cpp and transformers' reader have their own defaults.
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def pre_tokenizer_name(backend: dict) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a tokenizer.json, or UnsupportedGGUFExport if it has none.

    Recognised shapes:
      ByteLevel(use_regex=True)                        -> "gpt-2"   (GPT-2's regex)
      Digits(individual) + ByteLevel(use_regex=True)   -> "smollm"  (SmolLM / SmolLM2)
      Split(<llama-3 regex>) + ByteLevel(no regex)     -> "llama-bpe"
      Split(<qwen2 regex>) + ByteLevel(no regex)       -> "qwen2"
    """
    normalizer = (backend.get("normalizer") or {}).get("type")
    if normalizer not in HARMLESS_NORMALIZERS:
        raise UnsupportedGGUFExport(f"GGUF cannot describe the tokenizer's {normalizer} normalizer")
    pre = backend.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if any(s.get("type") == "ByteLevel" and s.get("add_prefix_space") for s in steps):
        raise UnsupportedGGUFExport("GGUF has no byte-level BPE with add_prefix_space=True")
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and steps[1].get("use_regex", True)
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = steps[0].get("pattern", {}).get("Regex")
        if regex in SPLIT_NAMES and steps[0].get("behavior") == "Isolated":
            return SPLIT_NAMES[regex]
    raise UnsupportedGGUFExport(
        f"no GGUF pre-tokenizer name is known for this tokenizer's pre-tokenizer ({' + '.join(map(str, kinds))}); "
        "known: GPT-2 byte-level, SmolLM digits, Llama-3 and Qwen2 split regexes"
    )


def _merges(backend: dict) -> list[str]:
    # tokenizers >= 0.20 saves merges as pairs, older files as "a b" strings; GGUF wants strings.
    return [m if isinstance(m, str) else " ".join(m) for m in backend["model"].get("merges", [])]


def _added_with_bos_eos(tokenizer) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS by itself (a post-processor, as Llama-3's tokenizer has)."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(full) > len(plain) and full[0] == bos
    add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos
    return add_bos, add_eos


def sentencepiece_space_prefix(backend: dict) -> bool:
    """Whether a sentencepiece-style tokenizer prepends "▁" to the text (llama.cpp's
    `add_space_prefix`), for the shapes transformers builds: Llama (Metaspace, prepend "first"),
    Phi-3 (Prepend + Replace normalizer) and Gemma (Replace only, no prefix)."""
    normalizer = backend.get("normalizer") or {}
    steps = (
        normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    )
    kinds = [s.get("type") for s in steps if s]
    pre = backend.get("pre_tokenizer") or {}
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    if not kinds and pre.get("type") == "Metaspace" and pre.get("replacement") == "\u2581":
        if pre.get("prepend_scheme") in ("first", "always"):
            return True
        if pre.get("prepend_scheme") == "never":
            return False
    if kinds == ["Replace"] and steps[0] == replace:
        return False  # Gemma
    if (
        kinds == ["Prepend", "Replace"]
        and steps[0].get("prepend") == "\u2581"
        and steps[1] == replace
    ):
        return True  # Phi-3, Llama 2's original tokenizer.json
    raise UnsupportedGGUFExport(
        "no GGUF form is known for this sentencepiece-style tokenizer's normalizer "
        f"({' + '.join(map(str, kinds)) or 'none'}) and pre-tokenizer ({pre.get('type')})"
    )


def merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """Scores that make llama.cpp's sentencepiece merging (highest-scoring result first) follow the
    BPE merge order: a token made by merge rank r scores -r; tokens no merge makes score below all."""
    rank: dict[str, int] = {}
    for r, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", ""), r)
    floor = -float(len(merges))
    return [-float(rank[t]) if t in rank else floor - i for i, t in enumerate(tokens)]


def build_vocab(
    tokenizer,
    n_vocab: int,
    chat_template: str | None,
    stop_tokens: list[str] | None,
) -> GGUFVocab:
    """GGUF tokenizer metadata for `tokenizer`, padded to the model's `n_vocab` rows.

    Token types follow llama.cpp's converter: added tokens marked special are CONTROL (readers keep
    them whole and never split them), other added tokens USER_DEFINED, the rest NORMAL; ids the
    tokenizer does not use (an embedding larger than the vocabulary) get a `[PAD<id>]` placeholder.
    Byte-level BPE vocabularies carry no scores (llama.cpp's converter writes none either);
    sentencepiece-style ones get scores from the merge ranks (`merge_scores`).
    The first stop token that is not EOS becomes `eot_token_id`, which llama.cpp treats as an end of
    generation (ChatML's `<|im_end|>`, Llama-3's `<|eot_id|>`).
    """
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model_type = backend["model"].get("type")
    if model_type != "BPE":
        raise UnsupportedGGUFExport(f"only BPE tokenizers can be written to GGUF, not {model_type}")
    sentencepiece = bool(backend["model"].get("byte_fallback"))
    space_prefix = sentencepiece_space_prefix(backend) if sentencepiece else None
    pre = None if sentencepiece else pre_tokenizer_name(backend)
    vocab = tokenizer.get_vocab()
    if len(vocab) > n_vocab:
        raise UnsupportedGGUFExport(
            f"the tokenizer has {len(vocab)} tokens but the model embeds only {n_vocab}"
        )
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder  # {id: AddedToken}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.USER_DEFINED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(
                gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
            )
        elif sentencepiece and by_id[i] == tokenizer.unk_token:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.UNKNOWN)
        elif sentencepiece and _BYTE_TOKEN.fullmatch(by_id[i]):
            tokens.append(by_id[i])  # <0x0A>: the byte-fallback pieces
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)

    special_ids = {
        kind: token_id
        for kind in ("bos", "eos", "unk", "pad")
        if (token_id := getattr(tokenizer, f"{kind}_token_id")) is not None
    }
    for stop in stop_tokens or []:
        token_id = vocab.get(stop)
        if token_id is None:
            raise UnsupportedGGUFExport(f"stop token {stop!r} is not in the tokenizer's vocabulary")
        if token_id != special_ids.get("eos") and "eot" not in special_ids:
            special_ids["eot"] = token_id
    add_bos, add_eos = _added_with_bos_eos(tokenizer)
    template = chat_template if chat_template is not None else tokenizer.chat_template
    if template is not None and not isinstance(template, str):
        raise UnsupportedGGUFExport("GGUF holds one chat template; the tokenizer has several")
    merges = _merges(backend)
    return GGUFVocab(
        pre=pre,
        tokens=tokens,
        token_types=[int(t) for t in types],
        merges=merges,
        model="llama" if sentencepiece else "gpt2",
        scores=merge_scores(tokens, merges) if sentencepiece else None,
        add_space_prefix=space_prefix,
        special_ids=special_ids,
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=template,
    )
