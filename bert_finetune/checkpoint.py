"""Checkpoints that cannot be half-written: write under a temporary name, fsync, rename.

A training checkpoint is a folder `checkpoint-stepNNNNNN/` holding `model.safetensors`,
`training_state.pt` (optimizer, schedule, scaler, position, every rank's RNG states; loaded with
weights_only=True) and `manifest.json` (size and sha256 of both, written last). A folder whose
files do not match its manifest is damaged and skipped on resume. `best/` and `last/` are
`save_pretrained` folders, replaced atomically too.
"""
import errno
import hashlib
import json
import logging
import os
import re
import shutil
from contextlib import contextmanager

import torch
from safetensors.torch import load_file, save as save_bytes

from .errors import UserError, WriteError

log = logging.getLogger("bert_finetune")

PREFIX = "checkpoint-step"
MODEL_FILE = "model.safetensors"
STATE_FILE = "training_state.pt"
MANIFEST = "manifest.json"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


def make_output_dir(path: str):
    """Create the output folder, or say in one line why it cannot be written."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output-dir {path}: cannot be created: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"--output-dir {path}: not writable")


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(final: str):
    """Yield a temporary folder; on success it replaces `final` in one rename. A write that fails inside
    becomes a WriteError that names `final` and the cause; `final` is left as it was and the temporary
    folder is removed."""
    parent = os.path.dirname(os.path.abspath(final))
    tmp = f"{final}{TMP}{os.getpid()}"
    try:
        os.makedirs(parent, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        yield tmp
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        old = f"{final}{OLD}{os.getpid()}"
        if os.path.exists(final):  # a crash between these renames leaves old; sweep() puts it back
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(parent)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise WriteError(f"cannot write {final}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _writing(write):
    """Run a library's write; torch's zip writer and safetensors report a failed write (disk full, quota, a
    file system gone) in exception types of their own: those become an OSError, which atomic_dir reports."""
    try:
        write()
    except OSError:
        raise
    except Exception as e:
        text = str(e).strip()
        raise OSError(errno.EIO, text.splitlines()[-1] if text else type(e).__name__) from None


TMP, OLD = ".tmp-", ".old-"
_LEFTOVER = re.compile(rf"^(?P<name>{PREFIX}\d+|best|last|results\.json)(?P<kind>\.tmp-|\.old-)\d+$")


def sweep(output_dir: str):
    """Clean up after a process killed while saving (rank 0, at start): remove the project's temporary
    folders and files, and put back a best/ or last/ whose replacement was cut between its two renames."""
    if not os.path.isdir(output_dir):
        return
    for name in sorted(os.listdir(output_dir)):
        m = _LEFTOVER.match(name)
        if not m:
            continue
        path, final = os.path.join(output_dir, name), os.path.join(output_dir, m.group("name"))
        if m.group("kind") == OLD and not os.path.exists(final):
            os.rename(path, final)
            log.warning("%s: restored from %s (a save was interrupted)", final, name)
        elif os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)


def warn_if_no_room(output_dir: str, needed: int) -> bool:
    """Warn when the free space under output_dir is less than `needed` bytes (the last checkpoint's size);
    returns whether it warned."""
    try:
        free = shutil.disk_usage(output_dir).free
    except OSError:
        return False
    if free >= needed:
        return False
    log.warning("only %.1f GB free under %s, the last checkpoint took %.1f GB: the next one will not fit",
                free / 1e9, output_dir, needed / 1e9)
    return True


def size_of(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(folder: str) -> dict:
    return {name: {"bytes": os.path.getsize(os.path.join(folder, name)), "sha256": _sha256(os.path.join(folder, name))}
            for name in (MODEL_FILE, STATE_FILE)}


def path_for(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"{PREFIX}{step:06d}")


class _HashingFile:
    """A file being written, hashed on the way: a multi-GB checkpoint is not read back to be checksummed
    (rank 0's save is time the other ranks spend waiting in a collective)."""

    def __init__(self, f):
        self.f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha256.update(b)
        self.bytes += len(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()


def _write_hashed(path: str, write) -> dict:
    """write(file) into path; returns its manifest entry (bytes, sha256)."""
    with open(path, "wb") as f:
        hashed = _HashingFile(f)
        _writing(lambda: write(hashed))
    return {"bytes": hashed.bytes, "sha256": hashed.sha256.hexdigest()}


def save(output_dir: str, step: int, model_state: dict, training_state: dict) -> str:
    path = path_for(output_dir, step)
    with atomic_dir(path) as tmp:
        tensors = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
        manifest = {MODEL_FILE: _write_hashed(os.path.join(tmp, MODEL_FILE), lambda f: f.write(save_bytes(tensors))),
                    STATE_FILE: _write_hashed(os.path.join(tmp, STATE_FILE), lambda f: torch.save(training_state, f))}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
    return path


def step_of(path: str) -> int:
    m = _NAME.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else -1


def list_checkpoints(output_dir: str) -> list:
    """Checkpoint folders in output_dir, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [os.path.join(output_dir, n) for n in os.listdir(output_dir) if _NAME.match(n)]
    return sorted(found, key=step_of)


def problem(path: str) -> str | None:
    """Why a checkpoint folder cannot be used, or None when its files match the manifest."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            expected = json.load(f)
    except (OSError, ValueError):
        return "no readable manifest.json (interrupted while writing?)"
    for name, want in expected.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if os.path.getsize(file) != want["bytes"]:
            return f"{name} is truncated ({os.path.getsize(file)} of {want['bytes']} bytes)"
        if _sha256(file) != want["sha256"]:
            return f"{name} is corrupted (checksum mismatch)"
    return None


def find_resume(spec: str, output_dir: str) -> str | None:
    """The checkpoint to resume from: `auto` = newest valid in output_dir (None if none), else a path."""
    if spec != "auto":
        path = spec[:-len(STATE_FILE)] if spec.endswith(STATE_FILE) else spec
        if not os.path.isdir(path):
            raise UserError(f"--resume {spec}: no such checkpoint folder")
        why = problem(path)
        if why:
            raise UserError(f"--resume {spec}: not a usable checkpoint: {why}")
        return path
    for path in reversed(list_checkpoints(output_dir)):
        why = problem(path)
        if why is None:
            return path
        log.warning("checkpoint %s is damaged: %s; falling back to the previous one", path, why)
    return None


def load(path: str) -> tuple[dict, dict]:
    """(model state dict, training state); training state is loaded with weights_only=True."""
    try:
        model_state = load_file(os.path.join(path, MODEL_FILE))
        training_state = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=True)
    except Exception as e:  # a file that passed its checksum but does not parse is still the user's problem
        raise UserError(f"checkpoint {path} cannot be loaded: {str(e).splitlines()[0]}") from None
    return model_state, training_state


def rotate(output_dir: str, keep: int, protect=()):
    """Delete the oldest checkpoints beyond `keep`; never the newest valid one nor those in `protect`."""
    found = list_checkpoints(output_dir)
    newest_valid = next((p for p in reversed(found) if problem(p) is None), None)
    keep_set = {os.path.normpath(p) for p in protect if p} | {newest_valid}
    surplus = len(found) - max(keep, 1)
    for path in found:
        if surplus <= 0:
            break
        if os.path.normpath(path) in keep_set or path == newest_valid:
            continue
        shutil.rmtree(path, ignore_errors=True)
        surplus -= 1


def export(model, tokenizer, path: str, extra: dict):
    """A save_pretrained folder (safetensors) plus bert_finetune.json, replacing `path` atomically."""
    with atomic_dir(path) as tmp:
        _writing(lambda: model.save_pretrained(tmp, safe_serialization=True))
        _writing(lambda: tokenizer.save_pretrained(tmp))
        with open(os.path.join(tmp, "bert_finetune.json"), "w") as f:
            json.dump(extra, f, indent=1)


def write_json(path: str, obj):
    """A JSON file written under a temporary name, fsynced, then renamed over `path` (a WriteError if not)."""
    tmp = f"{path}{TMP}{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise WriteError(f"cannot write {path}: {e.strerror or e}") from None
