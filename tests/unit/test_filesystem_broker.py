"""The embedded broker never hands a consumer a half-written message."""

from __future__ import annotations

from pathlib import Path
from queue import Empty

import pytest
from kombu import Connection

from thyrocad.worker.filesystem_broker import Transport


def connection(folder: Path) -> Connection:
    options = {
        "data_folder_in": str(folder),
        "data_folder_out": str(folder),
        "control_folder": str(folder / "control"),
    }
    return Connection("filesystem://", transport=Transport, transport_options=options)


def test_messages_round_trip(tmp_path: Path) -> None:
    with connection(tmp_path) as conn:
        queue = conn.SimpleQueue("inference")
        queue.put({"ids": [1, 2, 3]})
        assert queue.get(timeout=1).payload == {"ids": [1, 2, 3]}
        queue.close()


def test_a_message_being_written_is_invisible(tmp_path: Path) -> None:
    # What a producer leaves while writing: with the stock transport, an empty
    # '<stamp>_<uuid>.inference.msg' here made the consumer crash on decoding.
    (tmp_path / ".1_abc.inference.msg.partial").write_bytes(b"")
    with connection(tmp_path) as conn:
        channel = conn.default_channel
        with pytest.raises(Empty):
            channel._get("inference")
        assert channel._size("inference") == 0
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == [".1_abc.inference.msg.partial"]
