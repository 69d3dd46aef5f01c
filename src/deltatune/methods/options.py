"""How a method appears on ``deltatune train``'s command line: its name, its flags, its defaults for a run.

Each method file declares one ``MethodCli`` next to its Config (``CLI``, at the end of the file) and its
registry entry points at it (``Method(..., cli=lora.CLI)``). ``train/config.py`` and ``cli.py`` read only the
registry, so a new method brings its flags, YAML keys and defaults without either of them changing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KINDS = ("int", "number", "text", "names", "bool")


@dataclass(frozen=True)
class CliOption:
    """One flag of ``deltatune train`` that sets one field of the method's config.

    Attributes:
        flag: the flag without its dashes ("bottleneck-size"); the YAML key and TrainConfig name is ``key``
            (dashes as underscores). Methods may share a flag (each with its own field and default) when they
            agree on its ``kind``.
        field: the config field it sets ("bottleneck_size"; LoRA's --alpha sets "lora_alpha").
        kind: "int", "number", "text", "names" (comma-separated names or a regex, as --target-modules) or "bool"
            (--flag / --no-flag).
        default: what a training run uses when the flag is not given; None leaves the config class's default.
        help: one line for ``deltatune train --help``.
        choices: the values a "text" flag takes; () for any.
        positive: a number must be > 0 (the config class may allow more than a training run makes sense of).
        label: how ``deltatune inspect`` names the value; None = ``key``.
    """

    flag: str
    field: str
    kind: str = "text"
    default: Any = None
    help: str = ""
    choices: tuple[str, ...] = ()
    positive: bool = False
    label: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:  # a typo in a declaration should fail at import, not in a user's run
            raise ValueError(f"CliOption {self.flag!r}: kind must be one of {KINDS}, got {self.kind!r}.")

    @property
    def key(self) -> str:
        """The name in TrainConfig and in YAML files: the flag with underscores."""
        return self.flag.replace("-", "_")


@dataclass(frozen=True)
class MethodCli:
    """A method as ``deltatune train --method NAME`` knows it.

    Attributes:
        name: the ``--method`` value ("lora", "ia3", "bottleneck", ...).
        options: its flags, in the order ``--help`` lists them.
        lr: the default peak learning rate for this method (methods that train few values need larger steps).
        target_modules: the default ``--target-modules`` of a run; None = the method's default per architecture.
            Methods whose config has no ``target_modules`` field refuse the flag.
    """

    name: str
    options: tuple[CliOption, ...] = ()
    lr: float = 1e-3
    target_modules: str | None = None
