"""The multi-task setting of the adapter lab: corpus domains plus text transformations.

Every task is a prompt and a target built from real text of the corpus (the training
examples come from training documents, the evaluation examples from validation ones):

- one language-modelling task per corpus domain (``lm-drama``, ``lm-code``, ...): the
  prompt names the domain, the target is a span of that domain's text;
- four transformations of a line of words: ``upper`` (upper-case), ``reverse`` (the words
  in reverse order), ``caesar`` (letters shifted by one, ``z -> a``) and ``vowels`` (vowels
  dropped);
- held-out tasks are compositions of held-in transformations (``reverse+upper`` is
  ``upper(reverse(s))``), so routing has skills to compose.

A sequence is ``"<instruction>: <source> => <target><eot>"``; only the target tokens and
the end-of-text token are scored.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from routelab.core import ConfigError
from routelab.lab.corpus import Document
from routelab.lab.tokenizer import TextTokenizer

VOWELS = frozenset("aeiouAEIOU")
WORD_LINE = re.compile(r"^[A-Za-z][A-Za-z ,;:'!?.-]*$")


def upper(text: str) -> str:
    return text.upper()


def reverse_words(text: str) -> str:
    return " ".join(reversed(text.split()))


def caesar(text: str, shift: int = 1) -> str:
    def rotate(c: str) -> str:
        if "a" <= c <= "z":
            return chr((ord(c) - 97 + shift) % 26 + 97)
        if "A" <= c <= "Z":
            return chr((ord(c) - 65 + shift) % 26 + 65)
        return c

    return "".join(rotate(c) for c in text)


def drop_vowels(text: str) -> str:
    return "".join(c for c in text if c not in VOWELS)


TRANSFORMS: dict[str, Callable[[str], str]] = {"upper": upper, "reverse": reverse_words, "caesar": caesar,
                                              "vowels": drop_vowels}
DEFAULT_HELD_OUT = ("reverse+upper", "caesar+vowels", "reverse+vowels")


@dataclass(frozen=True)
class Task:
    """A task: its name, instruction text and kind (``lm`` or ``transform``); ``steps`` are the
    transformations applied in order (a composition when more than one)."""

    name: str
    kind: str
    steps: tuple[str, ...] = ()
    domain: str | None = None

    @property
    def instruction(self) -> str:
        return f"{self.domain} text" if self.kind == "lm" else " then ".join(self.steps)

    def apply(self, text: str) -> str:
        for step in self.steps:
            text = TRANSFORMS[step](text)
        return text


def make_tasks(domains: Sequence[str], held_out: Sequence[str] = DEFAULT_HELD_OUT) -> tuple[list[Task], list[Task]]:
    """Held-in tasks (one LM task per domain, then the four transformations) and held-out compositions."""
    held_in = [Task(f"lm-{d}", "lm", domain=d) for d in domains] + [Task(n, "transform", (n,)) for n in TRANSFORMS]
    outs = []
    for name in held_out:
        steps = tuple(name.split("+"))
        unknown = [s for s in steps if s not in TRANSFORMS]
        if unknown or len(steps) < 2:
            raise ConfigError(f"held-out task {name!r} must compose >= 2 of {sorted(TRANSFORMS)} with '+', e.g. reverse+upper.")
        outs.append(Task(name, "transform", steps))
    return held_in, outs


def word_lines(documents: Sequence[Document], min_words: int, max_words: int) -> list[str]:
    """Lines of plain words (letters and light punctuation) with ``min_words..max_words`` words."""
    lines = []
    for doc in documents:
        for raw in doc.text.splitlines():
            line = " ".join(raw.split())
            if WORD_LINE.match(line) and min_words <= len(line.split()) <= max_words:
                lines.append(line)
    return lines


@dataclass
class Example:
    """Token ids of one example: prompt (not scored) and target (scored, ends with end-of-text)."""

    prompt: list[int]
    target: list[int]


class TaskData:
    """Examples of every task for one split, and padded batches of them.

    Args:
        documents: the split's documents (all domains).
        tokenizer: the base model's tokenizer.
        tasks: the tasks to build.
        max_len: longest sequence in tokens (longer examples are cut from the target end).
        num_examples: examples per task.
    """

    def __init__(self, documents: Sequence[Document], tokenizer: TextTokenizer, tasks: Sequence[Task], *,
                 max_len: int, num_examples: int, seed: int, lm_chars: int = 160,
                 min_words: int = 3, max_words: int = 7) -> None:
        self.tasks = list(tasks)
        self.tokenizer = tokenizer
        self.max_len = max_len
        rng = np.random.default_rng(seed)
        lines = word_lines(documents, min_words, max_words)
        if not lines:
            raise ConfigError("the corpus has no lines of plain words for the transformation tasks; use a corpus "
                              "with prose (the default corpus has English drama).")
        self.examples: dict[str, list[Example]] = {}
        for task in self.tasks:
            if task.kind == "lm":
                texts = [d.text for d in documents if d.domain == task.domain and len(d.text) > lm_chars]
                if not texts:
                    raise ConfigError(f"domain {task.domain!r} has no document longer than {lm_chars} characters.")
                pairs = []
                for _ in range(num_examples):
                    text = texts[int(rng.integers(len(texts)))]
                    start = int(rng.integers(len(text) - lm_chars))
                    pairs.append((f"{task.instruction}:", text[start:start + lm_chars]))
            else:
                chosen = rng.choice(len(lines), size=num_examples, replace=len(lines) < num_examples)
                pairs = [(f"{task.instruction}: {lines[i]} =>", " " + task.apply(lines[i])) for i in chosen]
            self.examples[task.name] = [self._encode(prompt, target) for prompt, target in pairs]

    def _encode(self, prompt: str, target: str) -> Example:
        prompt_ids = self.tokenizer.encode(prompt)
        target_ids = self.tokenizer.encode(target) + [self.tokenizer.eot_id]
        room = self.max_len + 1 - len(prompt_ids)
        if room < 2:
            raise ConfigError(f"max_len={self.max_len} leaves no room for a target after the prompt {prompt!r}.")
        return Example(prompt_ids, target_ids[:room])

    def batch(self, pairs: Sequence[tuple[int, Example]]) -> dict[str, torch.Tensor]:
        """``inputs``/``targets`` ``[B, S]`` (``-100`` off-target), ``padding_mask`` and ``task_ids`` ``[B]``."""
        seqs = [ex.prompt + ex.target for _, ex in pairs]
        width = max(len(s) for s in seqs) - 1
        inputs = torch.full((len(seqs), width), self.tokenizer.eot_id, dtype=torch.int64)
        targets = torch.full((len(seqs), width), -100, dtype=torch.int64)
        mask = torch.zeros(len(seqs), width, dtype=torch.bool)
        for row, ((_, ex), seq) in enumerate(zip(pairs, seqs)):
            n = len(seq) - 1
            inputs[row, :n] = torch.tensor(seq[:-1])
            mask[row, :n] = True
            first = len(ex.prompt) - 1
            targets[row, first:n] = torch.tensor(seq[first + 1:])
        return {"inputs": inputs, "targets": targets, "padding_mask": mask,
                "task_ids": torch.tensor([t for t, _ in pairs], dtype=torch.int64)}

    def sample(self, task_ids: Sequence[int], batch_size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """A batch of ``batch_size`` examples of tasks drawn uniformly from ``task_ids``."""
        pairs = []
        for _ in range(batch_size):
            task = int(task_ids[int(rng.integers(len(task_ids)))])
            examples = self.examples[self.tasks[task].name]
            pairs.append((task, examples[int(rng.integers(len(examples)))]))
        return self.batch(pairs)

    def eval_batches(self, task: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
        examples = self.examples[self.tasks[task].name]
        return [self.batch([(task, ex) for ex in examples[i:i + batch_size]]) for i in range(0, len(examples), batch_size)]
