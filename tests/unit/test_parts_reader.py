"""PartsReader reads like one file of its parts joined, whatever the reads and seeks."""

from __future__ import annotations

import io
import random

from thyrocad.pacs.received import PartsReader


def test_reads_and_seeks_match_one_joined_file() -> None:
    rng = random.Random(7)
    for _ in range(200):
        data = rng.randbytes(rng.randint(0, 400))
        cuts = sorted(rng.randint(0, len(data)) for _ in range(rng.randint(0, 4)))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        parts = [p if rng.random() < 0.5 else memoryview(p) for p in pieces]
        reader, plain = PartsReader(parts), io.BytesIO(data)
        for _ in range(30):
            if rng.random() < 0.2:
                offset = rng.randint(-10, len(data) + 10)
                whence = rng.choice([io.SEEK_SET, io.SEEK_CUR, io.SEEK_END])
                target = {io.SEEK_SET: 0, io.SEEK_CUR: plain.tell(), io.SEEK_END: len(data)}
                plain.seek(max(0, target[whence] + offset))
                reader.seek(offset, whence)
            else:
                size = rng.choice([-1, None, 0, 1, 2, 4, 8, rng.randint(0, 500)])
                assert reader.read(size) == plain.read(size), (pieces, size)
            assert reader.tell() == plain.tell()
        buffer = bytearray(16)
        reader.seek(0)
        assert reader.readinto(buffer) == min(16, len(data))
        assert bytes(buffer[: min(16, len(data))]) == data[:16]
