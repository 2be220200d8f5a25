"""The one prompt and label format. Training, evaluation and serving all encode through `PromptFormat`, so
the tokens a served request sees are the tokens the model was trained on.
"""

from __future__ import annotations

import copy
import re
import weakref
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional, Sequence

_LONGEST: dict = {}  # (tokenizer id, format) -> longest label completion in tokens; encode() runs per request
_AROUND: dict = {}  # (tokenizer id, format) -> the chat prompt's text before and after the user's text, or None
_PARTS: dict = {}  # (tokenizer id, format) -> the prompt's ids and text around the user's text (_prompt_ids)
_PLAIN: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> backend that reads specials as text
_MARK = " \x00textclf\x00 "  # edge spaces: a template that strips or escapes the content cannot be split

# Worded so the prefix every prompt of the bundled task shares (template + instruction + labels) fills two of vLLM's
# 32-token CPU prefix-cache blocks rather than one.
DEFAULT_INSTRUCTION = (
    "Classify the user's message into exactly one of these categories: {labels}. "
    "Answer with the category name only, nothing else."
)


def token_ids(tokenizer, s: str, special_tokens: bool = False) -> list[int]:
    """The tokenizer's ids for s, as `tokenizer(s, add_special_tokens=...)["input_ids"]` gives them.

    A fast tokenizer's Rust backend gives the same ids without the Python wrapper's per-call overhead, which served
    requests pay once each; but only while the backend has no padding or truncation of its own, which a
    tokenizer.json may carry (all-MiniLM-L6-v2's pads every text to 128 until the wrapper is first called)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and backend.padding is None and backend.truncation is None:
        return backend.encode(s, add_special_tokens=special_tokens).ids
    return tokenizer(s, add_special_tokens=special_tokens)["input_ids"]


def text_token_ids(tokenizer, s: str, special_tokens: bool = False) -> list[int]:
    """The ids of a user's text read as plain text: a special token written in it (`<|im_start|>`, `[SEP]`) becomes
    its characters' tokens, never the control token; special_tokens adds the tokenizer's own ([CLS] ... [SEP]).
    Text without special tokens gets the ids `token_ids` gives.

    A fast tokenizer gets a copy of its backend with encode_special_tokens set, padding and truncation off: the
    wrapper's split_special_tokens=True leaves that flag set on the shared backend after the call."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        return tokenizer(s, add_special_tokens=special_tokens, split_special_tokens=True)["input_ids"]
    plain = _PLAIN.get(tokenizer)
    if plain is None:
        plain = copy.deepcopy(backend)
        plain.encode_special_tokens = True
        plain.no_padding()
        plain.no_truncation()
        _PLAIN[tokenizer] = plain
    return plain.encode(s, add_special_tokens=special_tokens).ids


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]  # prompt tokens, then the completion's when a label was given
    prompt_length: int
    truncated: bool  # the text was cut to fit max_length

    @property
    def completion_mask(self) -> list[int]:
        return [0] * self.prompt_length + [1] * (len(self.input_ids) - self.prompt_length)


@dataclass(frozen=True)
class PromptFormat:
    labels: tuple[str, ...]
    instruction: str = DEFAULT_INSTRUCTION
    use_chat_template: bool = True
    max_length: int = 256
    # What the model answers for each label: the label itself (None), or a one-token code per label where the names
    # do not each start with a token of their own (fit_answers); the answers' first tokens score every label at once.
    answers: Optional[tuple[str, ...]] = None
    list_labels: bool = True  # the prompt lists the answers; off for label sets too long to list

    def __post_init__(self):
        if len(self.labels) < 2:
            raise ValueError(f"a classifier needs at least 2 labels, got {list(self.labels)}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be unique")
        if self.answers is not None and (
            len(self.answers) != len(self.labels) or len(set(self.answers)) != len(self.answers)
        ):
            raise ValueError("answers must be unique, one per label")

    @property
    def answer_texts(self) -> tuple[str, ...]:
        return self.answers or self.labels

    # -- settings travel with the exported model (classifier.json) -----------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"] = list(self.labels)
        d["answers"] = list(self.answers) if self.answers else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PromptFormat":
        return cls(
            labels=tuple(d["labels"]),
            instruction=d.get("instruction", DEFAULT_INSTRUCTION),
            use_chat_template=d.get("use_chat_template", True),
            max_length=d.get("max_length", 256),
            answers=tuple(d["answers"]) if d.get("answers") else None,
            list_labels=d.get("list_labels", True),
        )

    # -- text -----------------------------------------------------------------------------------------------
    @property
    def system_text(self) -> str:
        if self.list_labels:
            return self.instruction.format(labels=", ".join(self.answer_texts))
        return self.instruction.format(labels=f"the {len(self.labels)} categories learned in training")

    def _chat(self, tokenizer) -> bool:
        return self.use_chat_template and bool(getattr(tokenizer, "chat_template", None))

    def prompt(self, tokenizer, text: str) -> str:
        """The prompt string, ending where the label starts."""
        if self._chat(tokenizer):
            around = self._around(tokenizer)
            return around[0] + text + around[1] if around else self._render(tokenizer, text)
        bos = tokenizer.bos_token or ""
        return f"{bos}{self.system_text}\n\nText: {text}\nCategory: "

    def _render(self, tokenizer, text: str) -> str:
        # A system message of our own also replaces a template's long default one (SmolLM2 has one).
        messages = [{"role": "system", "content": self.system_text}, {"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _around(self, tokenizer) -> Optional[tuple[str, str]]:
        """The rendered template split around the text, when it inserts the text verbatim: rendering the Jinja
        template per request cost a fifth of the serving-time encode."""
        key = (id(tokenizer), self)
        if key not in _AROUND:
            parts = self._render(tokenizer, _MARK).split(_MARK)
            ok = len(parts) == 2 and self._render(tokenizer, "a b\n") == parts[0] + "a b\n" + parts[1]
            _AROUND[key] = (parts[0], parts[1]) if ok else None
        return _AROUND[key]

    def _split(self, tokenizer) -> Optional[tuple[str, str]]:
        """The prompt string before and after the user's text; None when a template changes the text."""
        if self._chat(tokenizer):
            return self._around(tokenizer)
        parts = self.prompt(tokenizer, _MARK).split(_MARK)
        return (parts[0], parts[1]) if len(parts) == 2 else None

    def _prompt_ids(self, tokenizer, text: str) -> list[int]:
        """The prompt's ids with the user's text read as plain text (text_token_ids), so that a text cannot write the
        template's control tokens. The prompt is cut at the special tokens next to the text, where the tokenizer
        splits it anyway: a text without special tokens gets the ids of the whole prompt string."""
        key = (id(tokenizer), self)
        if key not in _PARTS:
            split = self._split(tokenizer)
            if split is None:
                _PARTS[key] = None
            else:
                before, after = split
                specials = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
                cut = max((before.rfind(t) + len(t) for t in specials if t in before), default=0)
                end = min((after.find(t) for t in specials if t in after), default=len(after))
                _PARTS[key] = (
                    self._ids(tokenizer, before[:cut]),
                    before[cut:],
                    after[:end],
                    self._ids(tokenizer, after[end:]),
                )
        parts = _PARTS[key]
        if parts is None:  # a template that does not insert the text verbatim: its rendering as it is
            return self._ids(tokenizer, self.prompt(tokenizer, text))
        head, lead, trail, tail = parts
        return head + text_token_ids(tokenizer, lead + text + trail) + tail

    def completion(self, tokenizer, label: str) -> str:
        """What the model must produce for a label: its answer and the end-of-turn marker, exactly as the template
        has it."""
        return self._completion(tokenizer, self.answer_texts[self.labels.index(label)])

    def _completion(self, tokenizer, label: str) -> str:
        if self._chat(tokenizer):
            messages = [
                {"role": "system", "content": self.system_text},
                {"role": "user", "content": "x"},
            ]
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": label}], tokenize=False)
            if full.startswith(prompt):
                return full[len(prompt) :].rstrip("\n")
            return label + (tokenizer.eos_token or "")
        return label + (tokenizer.eos_token or "")

    # -- tokens ---------------------------------------------------------------------------------------------
    def _ids(self, tokenizer, s: str) -> list[int]:
        return token_ids(tokenizer, s)  # the prompt string already carries the template's special tokens

    def encode(self, tokenizer, text: str, label: Optional[str] = None) -> Encoded:
        """Prompt (+ completion) token ids; an over-long text is cut by tokens so the label always fits.

        Without a label (inference) room is kept for the longest label, so a cut prompt plus any answer stays
        within max_length, as in training."""
        completion_ids = self._ids(tokenizer, self.completion(tokenizer, label)) if label is not None else []
        reserve = len(completion_ids) if label is not None else self._longest_completion(tokenizer)
        prompt_ids = self._prompt_ids(tokenizer, text)
        truncated = False
        if len(prompt_ids) + reserve > self.max_length:
            overhead = len(self._prompt_ids(tokenizer, "")) + reserve
            budget = self.max_length - overhead
            if budget < 1:
                raise ValueError(
                    f"max_length {self.max_length} leaves no room for text: the instruction and label take "
                    f"{overhead} tokens"
                )
            text_ids = text_token_ids(tokenizer, text)[:budget]
            cut = tokenizer.decode(text_ids, skip_special_tokens=True)
            prompt_ids = self._prompt_ids(tokenizer, cut)
            # Decoding and re-encoding can merge tokens differently: trim until it fits.
            while len(prompt_ids) + reserve > self.max_length and cut:
                cut = cut[:-1]
                prompt_ids = self._prompt_ids(tokenizer, cut)
            truncated = True
        return Encoded(input_ids=prompt_ids + completion_ids, prompt_length=len(prompt_ids), truncated=truncated)

    def _longest_completion(self, tokenizer) -> int:
        key = (id(tokenizer), self)
        if key not in _LONGEST:
            _LONGEST[key] = max(len(ids) for ids in self.label_token_ids(tokenizer))
        return _LONGEST[key]

    def label_token_ids(self, tokenizer) -> list[list[int]]:
        """Each label's completion tokens, as they follow the prompt."""
        return [self._ids(tokenizer, self.completion(tokenizer, label)) for label in self.labels]

    def first_tokens_distinct(self, tokenizer) -> bool:
        """When every label starts with its own token, one engine step scores all labels."""
        firsts = [ids[0] for ids in self.label_token_ids(tokenizer)]
        return len(set(firsts)) == len(firsts)

    def list_tokens(self, tokenizer) -> int:
        """Tokens the label list takes in the prompt."""
        return len(self._ids(tokenizer, ", ".join(self.answer_texts)))


def _words(label: str) -> list[str]:
    """A label's words as code candidates: snake_case, kebab-case, spaces and camelCase split."""
    return [w.lower() for w in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+", label)]


def label_codes(fmt: PromptFormat, tokenizer) -> tuple[str, ...]:
    """One single-token answer per label, each starting with a token no other answer starts with: a word of the label
    where one is free (so the answer still means something), else a short word from the vocabulary."""
    taken: set[int] = set()
    codes: list[Optional[str]] = []

    def first_token(code: str) -> Optional[int]:
        ids = fmt._ids(tokenizer, fmt._completion(tokenizer, code))
        alone = fmt._ids(tokenizer, code)
        return ids[0] if len(alone) == 1 and ids and ids[0] == alone[0] else None

    for label in fmt.labels:
        code = None
        words = _words(label)
        # whole words first, then each word's first token (a prefix still points at the word)
        prefixes = [tokenizer.decode(fmt._ids(tokenizer, w)[:1]) for w in words]
        for word in words + [p for p in prefixes if p.isalnum()]:
            tok = first_token(word)
            if tok is not None and tok not in taken:
                code = word
                taken.add(tok)
                break
        codes.append(code)
    if None in codes:
        pool = _vocabulary_words(tokenizer)
        for i, code in enumerate(codes):
            while code is None:
                word = next(pool)
                tok = first_token(word)
                if tok is not None and tok not in taken and word not in codes:
                    code = word
                    taken.add(tok)
            codes[i] = code
    return tuple(codes)  # type: ignore[arg-type]


def _vocabulary_words(tokenizer):
    """Plain lower-case words that are one token each, in the vocabulary's order (frequent merges first)."""
    for tok_id in range(len(tokenizer)):
        word = tokenizer.decode([tok_id])
        if word.isascii() and word.isalpha() and word.islower() and 3 <= len(word) <= 10:
            yield word


def fit_answers(fmt: PromptFormat, tokenizer, list_budget: int) -> PromptFormat:
    """The answers and the label list for this label set under this tokenizer: the label names when each starts
    with its own token, else one-token codes; listed in the prompt while the list fits in list_budget tokens, so the
    prompt stops growing with the label count."""
    if not fmt.first_tokens_distinct(tokenizer):
        fmt = replace(fmt, answers=label_codes(fmt, tokenizer))
    return replace(fmt, list_labels=fmt.list_tokens(tokenizer) <= list_budget)


def format_from_config(model_cfg, labels: Sequence[str]) -> PromptFormat:
    """The configured format; a max_length left to the data (None) stays at the dataclass default until fitted."""
    return PromptFormat(
        labels=tuple(labels),
        instruction=model_cfg.instruction,
        use_chat_template=model_cfg.use_chat_template,
        max_length=model_cfg.max_length or PromptFormat.max_length,
    )
