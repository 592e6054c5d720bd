"""The files of a ``save_pretrained`` folder besides the weights: ``config.json`` with a
recorded pruning plan on one line, and the tokenizer and processor files of the source.

``save_pretrained`` writes a config with one value per line (``json.dumps(indent=2)``), after
deep-copying it twice. A plan recorded for widths that differ per layer (:mod:`.sync`) lists
every kept position of every pruned tensor: for a Llama-3-8B-shaped model 20% narrower, 700k
indices, a 12.7 MB file and over 3 s of copying and encoding. :func:`compact_plan` lets
``save_pretrained`` write the rest as usual and puts the plan in as compact JSON, so the file
parses to the same values.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from torchslim.hf.sync import RECORD_KEY

CONFIG_NAME = "config.json"
#: files a pruned folder takes from its source as they are (the tokenizer, the processor, the
#: generation defaults)
COMPANIONS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*")
COMPANIONS += ("merges.txt", "chat_template.*", "*processor_config.json", "generation_config.json")
COMPANIONS += ("spiece.model", "sentencepiece.bpe.model", "spm.model", "*.tiktoken")
#: what ``save_pretrained`` writes in the plan's place, replaced afterwards
_PLACEHOLDER = f"<{RECORD_KEY} written separately>"


@contextmanager
def compact_plan(config: Any, folder: Union[str, Path]) -> Iterator[None]:
    """Around a ``save_pretrained`` into ``folder``: the ``config.json`` it writes gets the plan
    recorded in ``config`` on one line (also when the save fails after writing it). ``config``
    is unchanged afterwards; a config without a plan, or a call that writes no config (a
    process that is not the main one), is left to ``save_pretrained``."""
    plan = getattr(config, RECORD_KEY, None)
    if plan is None:
        yield
        return
    path = Path(folder) / CONFIG_NAME
    before = _identity(path)
    setattr(config, RECORD_KEY, _PLACEHOLDER)
    try:
        yield
    finally:
        setattr(config, RECORD_KEY, plan)
        written = _identity(path)
        if written is not None and written != before:
            _splice(path, config, plan)


def _identity(path: Path) -> Optional[tuple[int, int, int]]:
    """What tells a file rewritten from the one before (``None``: no file)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def _splice(path: Path, config: Any, plan: Any) -> None:
    """Put ``plan`` as compact JSON where ``save_pretrained`` wrote the placeholder."""
    text = path.read_text(encoding="utf-8")
    quoted = json.dumps(_PLACEHOLDER)
    if text.count(quoted) != 1:
        raise RuntimeError(f"{path}: save_pretrained did not write the {RECORD_KEY} field once")
    try:
        compact = json.dumps(plan, separators=(",", ":"), sort_keys=True, allow_nan=False)
    except ValueError:  # NaN or infinities: tagged as transformers tags them
        encode = getattr(type(config), "_encode_special_floats", lambda value: value)
        compact = json.dumps(encode(plan), separators=(",", ":"), sort_keys=True)
    path.write_text(text.replace(quoted, compact), encoding="utf-8")


def save_pretrained(saved: Any, folder: Union[str, Path], **kwargs: Any) -> None:
    """``saved.save_pretrained(folder, **kwargs)`` (a model or a config) with the recorded
    plan written on one line (:func:`compact_plan`). Saves locally: the plan is put in after
    ``save_pretrained`` returns, too late for its upload, so ``push_to_hub`` is refused."""
    if kwargs.get("push_to_hub"):
        raise ValueError(
            "tp.hf.save_pretrained saves locally: save, then upload the folder "
            "(huggingface_hub's upload_folder)"
        )
    if not kwargs.get("is_main_process", True):  # writes no config: nothing to put in
        saved.save_pretrained(folder, **kwargs)
        return
    with compact_plan(getattr(saved, "config", saved), folder):
        saved.save_pretrained(folder, **kwargs)


def copy_companions(source: Path, folder: Path) -> None:
    """Copy the :data:`COMPANIONS` of ``source`` into ``folder``, each unless ``folder`` has
    a file of its name (``save_pretrained`` wrote its own)."""
    for pattern in COMPANIONS:
        for file in source.glob(pattern):
            if file.is_file() and not (folder / file.name).exists():
                shutil.copy2(file, folder / file.name)
