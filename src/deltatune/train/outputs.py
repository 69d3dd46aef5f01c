"""Where ``train`` and ``merge`` write, checked before any model is loaded: no command destroys a user's files.

Refused:
- an output folder that already holds an adapter, a model or an earlier run's checkpoints, unless the user
  says ``--overwrite`` (``train --resume`` continues such a run instead of replacing it);
- always, an output that is the base model's folder or inside it: transformers would load an adapter found
  there together with the base from then on, and ``merge`` would write over the base weights;
- a folder that cannot be written (under a file, read-only, no permission): found here, in a second, not
  after minutes of loading and training.
"""

from __future__ import annotations

import os
import tempfile

from ..config import CONFIG_NAME
from ..formats.peft import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME

ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME)
WEIGHT_SUFFIXES = (".safetensors", ".gguf")
CHECKPOINTS = "checkpoints"  # the run folder's sub-folder of resumable checkpoints


def existing_work(folder: str) -> list[str]:
    """What in ``folder`` a command would replace: adapter files, model files, an earlier run's checkpoints.

    Returns:
        The names found (a model's ``config.json`` counts only beside weights), empty when there are none.
    """
    if not os.path.isdir(folder):
        return []
    names = set(os.listdir(folder))
    found = [name for name in ADAPTER_FILES if name in names]
    weights = sorted(n for n in names if n.endswith(WEIGHT_SUFFIXES) and n not in found and not n.startswith("."))
    if "config.json" in names and (weights or "pytorch_model.bin" in names):
        found.append("config.json")
    found += weights
    checkpoints = os.path.join(folder, CHECKPOINTS)
    if os.path.isdir(checkpoints) and any(n.startswith("checkpoint-") for n in os.listdir(checkpoints)):
        found.append(f"{CHECKPOINTS}/")
    return found


def check_output(output: str, protected: dict[str, str], overwrite: bool, resume: bool = False,
                 command: str = "train") -> None:
    """Refuse an output folder that would destroy files or cannot be written; changes nothing on disk.

    Args:
        output: the folder the command will write.
        protected: folders the output must not be, nor be inside, mapped to what they are (e.g. the base
            model's folder: "the base model's folder").
        overwrite: the user allows replacing an adapter, model or checkpoints already in ``output``.
        resume: ``train --resume``: the folder holds the run being continued.
        command: the command, for the advice in the message.

    Raises:
        ValueError: names the folder, what is wrong and what to do.
    """
    if os.path.isfile(output):
        raise ValueError(f"--output {output!r} is a file; give a folder.")
    for folder, what in protected.items():
        if _is_same_or_inside(output, folder):
            raise ValueError(f"--output {output!r} is {what} ({folder}) or inside it; writing there would change "
                             f"what loads from that folder. Choose an --output outside it.")
    found = existing_work(output)
    if found and not overwrite and not resume:
        hint = ", --resume to continue that run" if command == "train" and f"{CHECKPOINTS}/" in found else ""
        raise ValueError(f"--output {output!r} already holds {', '.join(found)} (an adapter, a model or an earlier "
                         f"run); pass --overwrite to replace it{hint}, or choose another --output.")
    check_writable(output)


def check_writable(output: str) -> None:
    """Create (and remove) a scratch folder where ``output`` is or will be made, so a read-only place fails now.

    ``os.access`` is not enough: it says yes to root on a read-only file system, and knows nothing of quotas.

    Raises:
        ValueError: ``output`` is under a file, or that place cannot be written.
    """
    existing = os.path.abspath(output)
    while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--output {output!r} is under {existing!r}, which is a file, not a folder; choose "
                         "another --output.")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".deltatune-write-test-", dir=existing))
    except OSError as err:
        raise ValueError(f"--output {output!r}: cannot write in {existing!r} ({err.strerror}); choose a folder "
                         "you can write to.") from err


def _is_same_or_inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)
