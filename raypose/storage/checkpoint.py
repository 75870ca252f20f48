"""Checkpoint format: a directory of plain files, verified by a manifest.

  model.pt        the model's state_dict (tensors only)
  optimizer.pt    the optimiser's state_dict (tensors and numbers only)
  config.json     the full raypose config (Config.to_dict())
  state.json      epoch (1-based, epochs done), stage, which heads exist, the epoch's metrics
  manifest.json   every other file's name, size and sha256, the config hash, the raypose version

Everything loads with torch.load(weights_only=True) or json: no arbitrary object is unpickled.
"""

import hashlib
import json
import os
import pickle
import re
import shutil
import socket
import tempfile
from pathlib import Path

from raypose import __version__, storage

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
CONFIG_FILE = "config.json"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
PAYLOAD_FILES = (MODEL_FILE, OPTIMIZER_FILE, CONFIG_FILE, STATE_FILE)


# Where a worker writes a checkpoint before Ray uploads it (and then deletes it):
# <temp dir>/raypose-checkpoints-<uid>/<host name>/<pid>-<random>, one tree per user, so that
# users sharing a host neither block nor clear each other's. A worker that ends while an upload is
# still running (ASHA stopping its trial, a killed process) leaves its folder behind, a few hundred
# MB each; the next worker on the same host removes the folders of processes that no longer exist.
SPOOL_DIR_NAME = "raypose-checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not belong to its manifest/config."""


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


class _HashingWriter:
    """A binary file that hashes what is written to it, so that a file of a few hundred MB is
    not read back to hash it."""

    def __init__(self, path):
        self._file = open(path, "wb")
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self._hash.update(data)
        self.size += len(memoryview(data))
        return self._file.write(data)

    def flush(self) -> None:
        self._file.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()

    def entry(self) -> dict:
        return {"size": self.size, "sha256": self._hash.hexdigest()}


def _write(path: Path, save_into) -> dict:
    with _HashingWriter(path) as f:
        save_into(f)
    entry = f.entry()
    assert entry["size"] == path.stat().st_size, path
    return entry


def upload(local_dir: str, target: str, fs) -> int:
    """Puts the checkpoint in local_dir into the folder target of fs (a pyarrow filesystem): the
    payload files first and manifest.json last, so that a folder with a manifest is complete.
    Returns how many files were hard links instead of copies.

    On a local filesystem (the storage is a path) each file becomes a hard link to the local one
    when both are on one device: nothing is copied, where a copy of the default model's 242 MB
    would cost CPU time every epoch, beside the training. Ray deletes the
    local folder once this returns, which leaves the linked files in storage. Anywhere else
    (another device, object storage) each file is copied."""
    import posixpath

    import pyarrow.fs

    fs.create_dir(target)
    local = isinstance(fs, pyarrow.fs.LocalFileSystem)
    linked = 0
    for name in (*PAYLOAD_FILES, MANIFEST_FILE):
        src, dst = os.path.join(local_dir, name), posixpath.join(target, name)
        if local:
            try:
                if os.path.lexists(dst):
                    os.unlink(dst)  # left by an earlier try of this upload
                os.link(src, dst)
                linked += 1
                continue
            except OSError:  # another device (EXDEV), or no hard links there: a copy
                pass
        pyarrow.fs.copy_files(
            src, dst, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs
        )
    return linked


def save(directory, model_state: dict, optimizer_state: dict, config: dict, state: dict) -> Path:
    """Write a checkpoint into directory (created if missing) and its manifest last."""
    import torch  # here, not at the top: drivers read manifests without importing torch

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    texts = {
        CONFIG_FILE: json.dumps(config, indent=1, sort_keys=True).encode(),
        STATE_FILE: json.dumps(state, indent=1, sort_keys=True).encode(),
    }
    files = {
        MODEL_FILE: _write(d / MODEL_FILE, lambda f: torch.save(model_state, f)),
        OPTIMIZER_FILE: _write(d / OPTIMIZER_FILE, lambda f: torch.save(optimizer_state, f)),
        **{
            name: _write(d / name, lambda f, text=text: f.write(text))
            for name, text in texts.items()
        },
    }
    manifest = {
        "raypose_version": __version__,
        "config_sha256": config_hash(config),
        "files": files,
    }
    (d / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return d


def read_json(directory, name: str) -> dict:
    """One of the checkpoint's JSON files (config.json, state.json, manifest.json) as a dict; a
    CheckpointError naming the file when it is missing, not UTF-8, not JSON or not an object."""
    d = Path(directory)
    p = d / name
    if not p.is_file():
        raise CheckpointError(f"checkpoint {d}: {name} is missing")
    try:
        value = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"checkpoint {d}: {name} is not JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"checkpoint {d}: {name} is not JSON ({e.msg} at line {e.lineno})"
        ) from None
    except (ValueError, RecursionError) as e:  # e.g. an int of more digits than Python converts
        raise CheckpointError(f"checkpoint {d}: {name} is not JSON ({type(e).__name__})") from None
    except OSError as e:
        raise CheckpointError(
            f"checkpoint {d}: {name} cannot be read ({e.strerror or type(e).__name__})"
        ) from None
    if not isinstance(value, dict):
        raise CheckpointError(
            f"checkpoint {d}: {name} holds a JSON {_json_type(value)}, expected an object"
        )
    return value


def _json_type(value) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _check_manifest(d: Path, manifest: dict) -> dict:
    """The manifest's own form: every key verify and its readers use, of the right type."""

    def bad(what):
        return CheckpointError(
            f"checkpoint {d}: {MANIFEST_FILE} is not a raypose manifest ({what})"
        )

    files = manifest.get("files")
    if not isinstance(files, dict):
        raise bad("'files' is missing or not an object")
    for key in ("config_sha256", "raypose_version"):
        if not isinstance(manifest.get(key), str):
            raise bad(f"{key!r} is missing or not a string")
    for name in PAYLOAD_FILES:
        if name not in files:
            raise CheckpointError(f"checkpoint {d}: {MANIFEST_FILE} does not list {name}")
        entry = files[name]
        size = entry.get("size") if isinstance(entry, dict) else None
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if (
            isinstance(size, bool)
            or not isinstance(size, int)
            or size < 0
            or not isinstance(digest, str)
        ):
            raise bad(
                f"the entry of {name} needs a 'size' (a whole number) and a 'sha256' (a string)"
            )
    return manifest


def verify(directory) -> dict:
    """Check every file against the manifest; returns the manifest. Raises CheckpointError."""
    d = Path(directory)
    if not (d / MANIFEST_FILE).is_file():
        raise CheckpointError(f"checkpoint {d}: {MANIFEST_FILE} is missing")
    manifest = read_json(d, MANIFEST_FILE)
    files = _check_manifest(d, manifest)["files"]
    for name in PAYLOAD_FILES:
        p = d / name
        if not p.is_file():
            raise CheckpointError(f"checkpoint {d}: {name} is missing")
        if (
            p.stat().st_size != files[name]["size"]
            or storage.sha256_file(p) != files[name]["sha256"]
        ):
            raise CheckpointError(
                f"checkpoint {d}: {name} does not match its manifest "
                "(sha256 or size differ): the file is corrupt or from another checkpoint"
            )
    config = read_json(d, CONFIG_FILE)
    if config_hash(config) != manifest["config_sha256"]:
        raise CheckpointError(
            f"checkpoint {d}: {CONFIG_FILE} does not match the manifest's config hash"
        )
    return manifest


def load_metadata(directory, verify_manifest: bool = True) -> dict:
    """The checkpoint's JSON files, without its weights: {'config', 'state', 'manifest'}, each
    file checked to be a JSON object (CheckpointError naming it). A caller checks the config
    before load_weights builds anything from it."""
    d = Path(directory)
    manifest = verify(d) if verify_manifest else None
    return {
        "config": read_json(d, CONFIG_FILE),
        "state": read_json(d, STATE_FILE),
        "manifest": manifest,
    }


def load_weights(directory, map_location="cpu") -> dict:
    """{'model', 'optimizer'}: the two state_dicts, loaded with weights_only=True."""
    d = Path(directory)
    return {
        "model": _load_weights(d, MODEL_FILE, map_location),
        "optimizer": _load_weights(d, OPTIMIZER_FILE, map_location),
    }


def load(directory, verify_manifest: bool = True, map_location="cpu") -> dict:
    """Load a checkpoint directory: {'model', 'optimizer', 'config', 'state', 'manifest'}."""
    meta = load_metadata(directory, verify_manifest)
    return {**load_weights(directory, map_location), **meta}


def _load_weights(d: Path, name: str, map_location):
    """torch.load(weights_only=True) of one file; a refusal or failure names the file."""
    import torch

    try:
        return torch.load(d / name, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CheckpointError(
                f"checkpoint {d}: cannot load {name} (UnpicklingError: {e})"
            ) from None
        # torch's message spans lines and suggests weights_only=False; keep the one fact that matters
        found = re.search(r"(Unsupported global: GLOBAL \S+|Unsupported operand \S+)", str(e))
        detail = f" ({found.group(0)})" if found else ""
        raise CheckpointError(
            f"checkpoint {d}: {name} holds objects other than tensors{detail}; "
            "raypose loads weights with weights_only=True and does not unpickle "
            "arbitrary objects"
        ) from None
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {d}: cannot load {name} ({type(e).__name__}: {e})"
        ) from None


# ----------------------------------------------------------------------------------------------
# The local spool of checkpoints waiting for their upload


def spool_dir() -> Path:
    """This host's folder of checkpoints written by workers and not yet uploaded."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"{SPOOL_DIR_NAME}-{uid}" / socket.gethostname()


def new_spool_dir() -> str:
    """A new, empty folder in this host's spool, named after this process."""
    base = spool_dir()
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    return tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=base)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _folder_bytes(folder: Path) -> int:
    total = 0
    for f in folder.rglob("*"):
        try:
            total += f.stat().st_size if f.is_file() else 0
        except OSError:  # removed meanwhile
            pass
    return total


def remove_orphaned_spool_dirs() -> tuple[int, int]:
    """Remove the spool folders on this host whose process has ended, which Ray will never
    upload or delete. Returns (folders, bytes) removed. Folders of running processes stay."""
    base = spool_dir()
    folders = size = 0
    if not base.is_dir():
        return folders, size
    for entry in base.iterdir():
        pid = entry.name.split("-", 1)[0]
        if not pid.isdigit() or _process_exists(int(pid)):
            continue
        size += _folder_bytes(entry)
        shutil.rmtree(entry, ignore_errors=True)  # another worker may be removing it too
        folders += 1
    return folders, size
