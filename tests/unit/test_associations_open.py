"""thyrocad_associations_open counts established associations, not bare connections."""

from __future__ import annotations

import socket
import time

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from tests.procs import free_port
from thyrocad.serve import open_associations


def test_a_connection_that_has_not_asked_is_not_an_open_association() -> None:
    ae = AE(ae_title="COUNT")
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_ECHO, lambda e: 0x0000)]
    )
    try:
        silent = socket.create_connection(("127.0.0.1", port))  # sends nothing
        deadline = time.monotonic() + 5
        while not server.active_associations and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.active_associations  # pynetdicom has a thread for it already
        assert open_associations([server]) == 0

        client = AE(ae_title="CALLER")
        client.add_requested_context(Verification)
        assoc = client.associate("127.0.0.1", port, ae_title="COUNT")
        assert assoc.is_established
        deadline = time.monotonic() + 5
        while open_associations([server]) != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert open_associations([server]) == 1
        assoc.release()
        silent.close()
    finally:
        server.shutdown()
