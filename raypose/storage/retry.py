"""Ray's view of object storage, retried through an outage.

Ray Train and Tune write their own records (checkpoint_manager_snapshot.json, the experiment
state) through the pyarrow filesystem raypose hands them, from the Train controller and the
trial drivers, and raypose's checkpoint upload goes through it from the workers. With pyarrow's
plain fsspec handler, one failed request while the object store restarts ends the run with a
ControllerError; with RetryingHandler every call retries for RAYPOSE_UPLOAD_RETRY_S seconds
(storage.retry_outage). Kept apart from storage.py so that commands which never start Ray do not
import pyarrow.
"""

import io
import shutil
import tempfile

import pyarrow
import pyarrow.fs

from raypose.storage import retry_outage


class _SpooledUpload(io.RawIOBase):
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
        return (type(self.fs) is type(other.fs) and self.fs.storage_args == other.fs.storage_args
                and self.fs.storage_options == other.fs.storage_options)

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
        return pyarrow.PythonFile(_SpooledUpload(self.fs, path), mode="w")


class _SealedUpload(_SpooledUpload):
    """An upload that also writes the file's seal (raypose.storage.seal) once the file is in storage."""

    def __init__(self, fs, path: str):
        super().__init__(fs, path)
        self._data = io.BytesIO()

    def write(self, b):
        self._data.write(b)
        return super().write(b)

    def close(self):
        if self.closed:
            return
        from raypose.storage import seal

        stamp_path = self._path + seal.SUFFIX
        new = seal.seal_text(seal.current_key(), self._path, self._data.getvalue()).encode()
        # the seal holds both the old and the new file's lines while the file is replaced, so a
        # process stopped between the two writes leaves a file its seal still covers
        try:
            old = retry_outage(f"reading {stamp_path}", lambda: self._fs.cat_file(stamp_path))
        except FileNotFoundError:
            old = b""
        if old:
            retry_outage(f"writing {stamp_path}", lambda: self._fs.pipe_file(stamp_path, old + new))
        super().close()
        retry_outage(f"writing {stamp_path}", lambda: self._fs.pipe_file(stamp_path, new))


class SealingHandler(RetryingHandler):
    """The filesystem Ray Tune gets (raypose.storage.seal): every file Tune would unpickle is sealed when
    written and checked against its seal when read. The handler holds no key (it is pickled
    into tuner.pkl and sent to Ray's processes): each process uses its own, seal.current_key."""

    def _open_for_reading(self, path):
        from raypose.storage import seal

        if not seal.guarded(path):
            return super()._open_for_reading(path)

        def read(p):
            with self.fs.open(p, "rb") as f:
                return f.read()

        data = retry_outage(f"reading {path}", lambda: read(path))
        try:
            stamp = retry_outage(f"reading {path}{seal.SUFFIX}", lambda: read(path + seal.SUFFIX))
        except FileNotFoundError:
            stamp = None
        seal.check(seal.current_key(), path, data, stamp, path)
        return pyarrow.BufferReader(data)

    def open_output_stream(self, path, metadata):
        from raypose.storage import seal

        if not seal.guarded(path):
            return super().open_output_stream(path, metadata)
        return pyarrow.PythonFile(_SealedUpload(self.fs, path), mode="w")

    def delete_file(self, path):
        from raypose.storage import seal

        super().delete_file(path)
        if seal.guarded(path):
            try:
                super().delete_file(path + seal.SUFFIX)
            except FileNotFoundError:
                pass

    def move(self, src, dest):
        from raypose.storage import seal

        if seal.guarded(src) or seal.guarded(dest):
            # a guarded file is moved with its seal only when the seal covers its new name
            data = self._open_for_reading(src).read()
            stream = self.open_output_stream(dest, None)
            stream.write(data)
            stream.close()
            self.delete_file(src)
            return None
        return super().move(src, dest)
