"""Chat templates -> token ids with labels on assistant turns only.

A conversation is tokenised segment by segment: role markers and user text are unsupervised,
assistant text and its end marker are supervised. ``<image>`` in any turn becomes the model's
image-token count of placeholder ids. A self-check decodes every supervised span and compares it
with the assistant text, so a template/tokenizer mismatch raises an error naming the sample
instead of silently training on nothing (a loss of 0). Text the tokenizer cannot spell (characters
it maps to its unknown piece) is not a mismatch: it is reported as ``unrepresentable_text`` and the
sample trains with the unknown pieces, or is skipped (``data.unrepresentable_text``).
"""
from __future__ import annotations

from dataclasses import dataclass

from megavlm.data.tokenizer import IMAGE_TOKEN
from megavlm.losses.lm_loss import IGNORE_INDEX

EOS = "<eos>"  # stands for the tokenizer's end-of-sequence id


class BadSample(ValueError):
    """A sample that cannot be turned into a training example (skipped and counted by the loader)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class TemplateMismatch(BadSample):
    """Supervised tokens do not decode back to the assistant text: the template or the tokenizer
    is wrong for the data, so every sample would be affected and the run stops at the first."""

    def __init__(self, message: str):
        super().__init__("template_mismatch", message)


class UnrepresentableText(BadSample):
    """The assistant text has characters the tokenizer maps to its unknown piece."""

    def __init__(self, message: str):
        super().__init__("unrepresentable_text", message)


UNREPRESENTABLE_POLICIES = ("train", "skip")


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    system: str          # text before the first turn ("" for none)
    user: str            # marker before each user turn
    assistant: str       # marker between a user turn and the reply
    end: str             # after each reply: EOS or literal text
    sep: str = ""        # after each reply's end (before the next user marker)


TEMPLATES = {
    # LLaVA's feature-alignment format: image then caption, caption supervised.
    "plain": ChatTemplate("plain", system="", user="", assistant="\n", end=EOS),
    # Vicuna v1 (LLaVA-1.5).
    "vicuna_v1": ChatTemplate(
        "vicuna_v1",
        system="A chat between a curious user and an artificial intelligence assistant. "
               "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        user=" USER: ", assistant=" ASSISTANT: ", end=EOS),
    # ChatML (Qwen2, InternVL 2.5 / 3).
    "chatml": ChatTemplate(
        "chatml", system="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
        user="<|im_start|>user\n", assistant="<|im_end|>\n<|im_start|>assistant\n", end="<|im_end|>", sep="\n"),
    # Llama-3 style headers.
    "llama3": ChatTemplate(
        "llama3", system="",
        user="<|start_header_id|>user<|end_header_id|>\n\n",
        assistant="<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", end="<|eot_id|>"),
}


def get_template(name: str) -> ChatTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; known: {', '.join(TEMPLATES)}") from None


def normalize_turns(conversations: list, sample_id: str) -> list[tuple[str, str]]:
    """LLaVA JSON turns -> [(user, assistant), ...]; checks roles alternate human/gpt."""
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    if not isinstance(conversations, list) or not conversations:
        raise BadSample("malformed_record", f"sample {sample_id}: 'conversations' must be a non-empty list")
    pairs, pending = [], None
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in roles:
            raise BadSample("malformed_record", f"sample {sample_id}: turn {i} needs 'from' (human/gpt) and a string 'value'")
        role = roles[turn["from"]]
        if (role == "user") != (pending is None):
            raise BadSample("malformed_record", f"sample {sample_id}: turn {i} breaks the human/gpt alternation")
        if role == "user":
            pending = turn["value"]
        else:
            pairs.append((pending, turn["value"]))
            pending = None
    if pending is not None:
        raise BadSample("malformed_record", f"sample {sample_id}: the last human turn has no answer")
    return pairs


class ConversationEncoder:
    """``unrepresentable``: "train" keeps a sample whose text has unknown characters (reported in
    ``notes``), "skip" raises ``UnrepresentableText``."""

    def __init__(self, tokenizer, template: ChatTemplate, tokens_per_image: int, image_token_id: int,
                 unrepresentable: str = "train", image_layout=None):
        if unrepresentable not in UNREPRESENTABLE_POLICIES:
            raise ValueError(f"unrepresentable={unrepresentable!r}; known: {', '.join(UNREPRESENTABLE_POLICIES)}")
        self.tok = tokenizer
        self.template = template
        self.tokens_per_image = tokens_per_image
        self.image_token_id = image_token_id
        self.unrepresentable = unrepresentable
        self.image_layout = image_layout   # the layout an image planner gave -> its ids (raw patch grids)

    def image_ids(self, views=1) -> list[int]:
        """The image-token positions of one image: ``views`` ViT inputs (tiles) of the model's
        tokens each, or, with an ``image_layout``, whatever ids that gives the image's planned layout."""
        if self.image_layout is not None:
            return self.image_layout(views)
        return [self.image_token_id] * (self.tokens_per_image * views)

    def _text(self, text: str, views) -> list[int]:
        """Token ids of text in which <image> marks image positions; ``views`` yields each image's
        number of ViT inputs in order."""
        ids: list[int] = []
        for i, part in enumerate(text.split(IMAGE_TOKEN)):
            if i:
                ids += self.image_ids(next(views))
            if part:
                ids += self.tok.encode(part)
        return ids

    def _end(self) -> list[int]:
        return [self.tok.eos_id] if self.template.end == EOS else self.tok.encode(self.template.end)

    def encode(self, pairs: list[tuple[str, str]], num_images: int, sample_id: str,
               image_views: list[int] | None = None, notes: list | None = None) -> tuple[list[int], list[bool]]:
        """(input ids, supervised flag per token). ``image_views``: ViT inputs per image (tiles;
        default one each). ``notes`` collects (reason, message) of what was kept despite a problem."""
        tags = sum(u.count(IMAGE_TOKEN) + a.count(IMAGE_TOKEN) for u, a in pairs)
        if tags != num_images:
            raise BadSample("image_tag_mismatch",
                            f"sample {sample_id}: {tags} {IMAGE_TOKEN} tag(s) in the text but {num_images} image(s)")
        t = self.template
        views = iter(image_views or [1] * num_images)
        ids = list(self.tok.bos_ids)
        sup = [False] * len(ids)
        if t.system:
            ids += self.tok.encode(t.system)
        sup += [False] * (len(ids) - len(sup))
        spans = []
        for user, answer in pairs:
            prompt = (self.tok.encode(t.user) if t.user.strip() else []) + self._text(user, views) + self.tok.encode(t.assistant)
            reply = self.tok.encode(answer) + self._end()
            ids += prompt
            sup += [False] * len(prompt)
            spans.append((len(ids), len(ids) + len(reply) - len(self._end()), answer))
            ids += reply
            sup += [True] * len(reply)
            if t.sep:
                sep = self.tok.encode(t.sep)
                ids += sep
                sup += [False] * len(sep)
        self._self_check(ids, spans, sample_id, notes)
        return ids, sup

    def encode_prompt(self, history: list[tuple[str, str]], question: str, num_images: int,
                      sample_id: str, image_views: list[int] | None = None) -> list[int]:
        """Ids up to and including the assistant marker of a new ``question`` (for generation)."""
        ids, _ = self.encode(history + [(question, "")], num_images, sample_id, image_views)
        return ids[: len(ids) - len(self._end())]

    def _self_check(self, ids: list[int], spans: list[tuple[int, int, str]], sample_id: str,
                    notes: list | None) -> None:
        for start, end, answer in spans:
            expected = answer.strip()
            if end <= start and expected:
                raise TemplateMismatch(f"sample {sample_id}: assistant text {answer!r} produced no supervised tokens")
            decoded = self.tok.decode(ids[start:end])
            if decoded == expected:
                continue
            unknown = self.tok.unknown_characters(expected) if hasattr(self.tok, "unknown_characters") else []
            if unknown:
                self._unrepresentable(sample_id, expected, unknown, notes)
            elif not hasattr(self.tok, "normalize") or decoded != self.tok.normalize(expected):
                raise TemplateMismatch(
                    f"sample {sample_id}: supervised tokens decode to {decoded!r}, expected the assistant text "
                    f"{expected!r} (template {self.template.name!r} / tokenizer {getattr(self.tok, 'path', '?')})")
            # else: only the tokenizer's normalisation (NFKC, whitespace runs) differs

    def _unrepresentable(self, sample_id: str, text: str, unknown: list[str], notes: list | None) -> None:
        chars = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in unknown[:8]) + (" ..." if len(unknown) > 8 else "")
        action = "trained with unknown pieces" if self.unrepresentable == "train" else "skipped"
        message = (f"sample {sample_id}: the tokenizer {getattr(self.tok, 'path', '?')} cannot represent {chars} in "
                   f"{text[:80]!r}: {action} (data.unrepresentable_text={self.unrepresentable}; a tokenizer "
                   f"with byte fallback spells every character)")
        if self.unrepresentable == "skip":
            raise UnrepresentableText(message)
        if notes is not None:
            notes.append(("unrepresentable_text", message))


def shifted_labels(ids: list[int], supervised: list[bool]) -> list[int]:
    """labels[t] = ids[t+1] where token t+1 is supervised, else IGNORE_INDEX."""
    return [ids[t + 1] if supervised[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]
