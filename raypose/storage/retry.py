"""Ray's view of object storage, retried through an outage.

Ray Train and Tune write their own records (checkpoint_manager_snapshot.json, the experiment
state) through the pyarrow filesystem raypose hands them, from the Train controller and the
trial drivers, and raypose's checkpoint upload goes through it from the workers. With pyarrow's
plain fsspec handler, one failed request while the object store restarts ends the run with a
ControllerError; with RetryingHandler every call retries for RAYPOSE_UPLOAD_RETRY_S seconds
(storage.retry_outage). Kept apart from raypose.storage so that commands which never start Ray do
not import pyarrow.
"""

import io
import shutil
import tempfile

import pyarrow
import pyarrow.fs

from raypose import storage
from raypose.storage import retry_outage


class SpooledUpload(io.RawIOBase):
    """An output stream that spools what is written (memory up to 16 MB, then a local temporary
    file) and uploads it on close, retrying an outage from the start of the file, so that a write
    cut half-way is sent again whole."""

    def __init__(self, fs, path: str):
        super().__init__()
        self._fs, self._path = fs, path
        self._spool = tempfile.SpooledTemporaryFile(max_size=16 << 20)

    def writable(self):
        return True

    def write(self, b):
        return self._spool.write(b)

    def close(self):
        if self.closed:
            return
        try:

            def put():
                self._spool.seek(0)
                with self._fs.open(self._path, "wb") as f:
                    shutil.copyfileobj(self._spool, f, 8 << 20)

            retry_outage(f"writing {self._path}", put)
        finally:
            self._spool.close()
            super().close()


class RetryingHandler(pyarrow.fs.FSSpecHandler):
    """pyarrow's fsspec handler with every call retried through an object-store outage. Errors
    that describe the store's content (not found, exists, not a folder) are raised at once."""

    def __eq__(self, other) -> bool:
        # pyarrow compares two PyFileSystems by their handlers. The same store with the same
        # settings, wherever the filesystem was made: fsspec's own equality also compares the
        # process and thread that made each instance, and Ray Train accepts a checkpoint only on
        # a filesystem equal to its storage filesystem (made in the driver; the checkpoint's in a
        # worker's upload thread)
        if not isinstance(other, RetryingHandler):
            return NotImplemented
        return (
            type(self.fs) is type(other.fs)
            and self.fs.storage_args == other.fs.storage_args
            and self.fs.storage_options == other.fs.storage_options
        )

    def __hash__(self) -> int:
        return hash(type(self.fs))

    def _retry(self, what, name, *args):
        method = getattr(super(), name)
        return retry_outage(what, lambda: method(*args))

    def get_file_info(self, paths):
        return self._retry("listing", "get_file_info", paths)

    def get_file_info_selector(self, selector):
        return self._retry(f"listing {selector.base_dir}", "get_file_info_selector", selector)

    def create_dir(self, path, recursive):
        return self._retry(f"creating {path}", "create_dir", path, recursive)

    def delete_dir(self, path):
        return self._retry(f"deleting {path}", "delete_dir", path)

    def delete_dir_contents(self, path, missing_dir_ok):
        return self._retry(f"deleting {path}", "delete_dir_contents", path, missing_dir_ok)

    def delete_file(self, path):
        return self._retry(f"deleting {path}", "delete_file", path)

    def move(self, src, dest):
        return self._retry(f"moving {src}", "move", src, dest)

    def copy_file(self, src, dest):
        return self._retry(f"copying {src}", "copy_file", src, dest)

    def _open_for_reading(self, path):
        # fsspec's isfile(), which the plain handler asks first, answers False when the store
        # is away; info() raises the connection error instead, which is retried
        def open_():
            if self.fs.info(path)["type"] != "file":
                raise FileNotFoundError(path)
            return pyarrow.PythonFile(self.fs.open(path, mode="rb"), mode="r")

        return retry_outage(f"opening {path}", open_)

    def open_input_stream(self, path):
        return self._open_for_reading(path)

    def open_input_file(self, path):
        return self._open_for_reading(path)

    def open_output_stream(self, path, metadata):
        return pyarrow.PythonFile(SpooledUpload(self.fs, path), mode="w")


def ray_storage(loc: storage.Location):
    """(storage_path, storage_filesystem) for Ray's RunConfig: the same filesystem as fsspec's,
    wrapped for pyarrow with every call retried through an outage (storage_retry); local
    paths go to Ray as they are."""
    if loc.scheme == "s3":
        return loc.path, pyarrow.fs.PyFileSystem(RetryingHandler(storage.filesystem(loc)))
    return loc.path, None
