"""Zero-shot classification tasks of the ``eval`` split, with classes balanced by construction.

Eval sample ``i`` belongs to task ``i mod T`` and, within it, to class ``(i div T) mod C``: every
task gets the same number of samples (±1) and every class within a task too, at any split size.
"""

from __future__ import annotations

from dataclasses import dataclass

from curation_platform.demo.attributes import DIGITS, DOMAINS, PATTERNS, SHAPES, TIMES_OF_DAY

EVAL_TASKS: dict[str, tuple[str, ...]] = {
    "domain": DOMAINS,
    "shape": SHAPES,
    "texture": PATTERNS,
    "digit": DIGITS,
    "time_of_day": TIMES_OF_DAY,
}
# Which domain a task's classes live in, and so which primary attribute a label pins.
_TASK_DOMAINS = {"shape": "shapes", "texture": "textures", "digit": "glyphs", "time_of_day": "scenes"}


@dataclass(frozen=True)
class EvalLabel:
    task: str
    label: str

    @property
    def domain(self) -> str:
        return _TASK_DOMAINS.get(self.task, self.label)

    @property
    def primary(self) -> str | None:
        """The primary attribute value the image must show; None when the label is the domain."""
        return None if self.task == "domain" else self.label


def eval_label(index: int) -> EvalLabel:
    tasks = tuple(EVAL_TASKS)
    task = tasks[index % len(tasks)]
    classes = EVAL_TASKS[task]
    return EvalLabel(task, classes[(index // len(tasks)) % len(classes)])
