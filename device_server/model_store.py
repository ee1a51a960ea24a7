"""Whole ONNX models uploaded in chunks, keyed by SHA-256, so each model is sent once.

Kept in memory with an LRU byte budget (a phone has little disk to spare, and a model is
re-sent cheaply if evicted: the client asks `HasModel` first). A model is stored only once it
is whole, matches its hash, parses as ONNX and names no file (`model_check`): nothing a client
uploads can make the runtime read the device's disk.
"""

from __future__ import annotations

import collections
import hashlib
import re
import threading
from collections.abc import Iterable

import onnx

from device_server.errors import InvalidConfigError, ModelNotFoundError, ResourceLimitError
from device_server.model_check import check_self_contained

__all__ = ["ModelStore", "MIN_CHUNK_BYTES", "MAX_CHUNK_BYTES", "parse_sha256"]

MIN_CHUNK_BYTES = 64 * 1024   # except the last chunk
MAX_CHUNK_BYTES = 1024 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")


def parse_sha256(text: str, what: str = "sha256") -> str:
    """The lower-case hex digest in `text`.

    Raises:
        InvalidConfigError: `text` is not 64 hex digits.
    """
    digest = text.strip().lower()
    if not _SHA256.fullmatch(digest):
        shown = repr(text[:70] + ("…" if len(text) > 70 else ""))
        raise InvalidConfigError(
            f"{what} must be the model's SHA-256 as 64 hex digits, got {shown}"
        )
    return digest


class ModelStore:
    def __init__(self, max_model_bytes: int, max_total_bytes: int) -> None:
        self.max_model_bytes = max_model_bytes
        self.max_total_bytes = max_total_bytes
        self._models: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, sha256: str) -> bool:
        with self._lock:
            return sha256 in self._models

    def get(self, sha256: str) -> bytes:
        with self._lock:
            data = self._models.get(sha256)
            if data is None:
                raise ModelNotFoundError(
                    f"no model with sha256 {sha256[:16]}… on this device: upload it first "
                    f"(UploadModel)"
                )
            self._models.move_to_end(sha256)
            return data

    def receive(self, chunks: Iterable[tuple[str, int, bytes]]) -> tuple[str, int]:
        """Assembles (sha256, total_bytes, data) chunks; checks size, hash and ONNX validity.

        Returns:
            (sha256, size in bytes).
        Raises:
            InvalidConfigError: missing header, wrong chunk size, hash mismatch, not ONNX.
            ResourceLimitError: the model is larger than the daemon accepts.
        """
        expected_sha = ""
        total = -1
        parts: list[bytes] = []
        received = 0
        pending_small = False
        for i, (sha, total_bytes, data) in enumerate(chunks):
            if i == 0:
                if total_bytes <= 0:
                    raise InvalidConfigError(
                        "the first chunk must carry the model's sha256 (64 hex digits) and "
                        "total_bytes > 0"
                    )
                sha = parse_sha256(sha, "the first chunk's sha256")
                if total_bytes > self.max_model_bytes:
                    raise ResourceLimitError(
                        f"model of {total_bytes} bytes exceeds this daemon's limit of "
                        f"{self.max_model_bytes} bytes (--max-model-mib)"
                    )
                expected_sha, total = sha.lower(), total_bytes
            if pending_small:
                raise InvalidConfigError(
                    f"chunk {i - 1} had {len(parts[-1])} bytes; only the last chunk may be "
                    f"smaller than {MIN_CHUNK_BYTES}"
                )
            if len(data) > MAX_CHUNK_BYTES:
                raise InvalidConfigError(
                    f"chunk {i} has {len(data)} bytes; send chunks of at most {MAX_CHUNK_BYTES}"
                )
            pending_small = len(data) < MIN_CHUNK_BYTES
            received += len(data)
            if received > total:
                raise InvalidConfigError(
                    f"received {received} bytes, more than the announced total_bytes {total}"
                )
            parts.append(data)
        if total < 0:
            raise InvalidConfigError("the upload carried no chunks")
        if received != total:
            raise InvalidConfigError(f"received {received} bytes of the announced {total}")
        blob = b"".join(parts)
        actual = hashlib.sha256(blob).hexdigest()
        if actual != expected_sha:
            raise InvalidConfigError(
                f"sha256 of the received bytes is {actual[:16]}…, not the announced "
                f"{expected_sha[:16]}…: the upload was corrupted or the hash is wrong"
            )
        try:
            model = onnx.load_from_string(blob)  # parses only: never reads external data
        except Exception as exc:  # protobuf's DecodeError, RecursionError for deep nesting
            message = f"the uploaded bytes are not a valid ONNX model (they do not parse: {exc})"
            raise InvalidConfigError(message) from None
        check_self_contained(model)  # before the checker, which would look for the files
        try:
            onnx.checker.check_model(model)
        except Exception as exc:  # onnx raises ValidationError, ...
            message = f"the uploaded bytes are not a valid ONNX model: {exc}"
            raise InvalidConfigError(message) from None
        self._add(actual, blob)
        return actual, len(blob)

    def _add(self, sha256: str, blob: bytes) -> None:
        with self._lock:
            self._models[sha256] = blob
            self._models.move_to_end(sha256)
            size = sum(len(b) for b in self._models.values())
            while size > self.max_total_bytes and len(self._models) > 1:
                _, evicted = self._models.popitem(last=False)
                size -= len(evicted)
