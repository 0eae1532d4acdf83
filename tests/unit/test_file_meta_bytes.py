"""The listener encodes a received instance's file meta itself: byte for byte what
pynetdicom's ``Event.file_meta`` encoded by pydicom gives, or pydicom's when in doubt."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from thyrocad.pacs.listener import ACCEPTED_TRANSFER_SYNTAXES
from thyrocad.pacs.meta import ULTRASOUND_SOP_CLASSES
from thyrocad.pacs.received import file_meta_bytes, received_parts


def _pydicom(sop_class: str, sop_instance: str, syntax: str) -> bytes:
    meta = create_file_meta(
        sop_class_uid=UID(sop_class),
        sop_instance_uid=UID(sop_instance),
        transfer_syntax=UID(syntax),
    )
    return b"\x00" * 128 + b"DICM" + encode_file_meta(meta)


US = "1.2.840.10008.5.1.4.1.1.6.1"
INSTANCES = ["1.2.3", "1.2.34", "2.25." + "1" * 59, "2.25." + "9" * 58, generate_uid(), "0.0"]


@pytest.mark.parametrize("sop_class", ULTRASOUND_SOP_CLASSES)
def test_every_class_and_syntax_encodes_as_pydicom_does(sop_class: str) -> None:
    for syntax in ACCEPTED_TRANSFER_SYNTAXES:
        for instance in INSTANCES:
            assert file_meta_bytes(UID(sop_class), UID(instance), UID(syntax)) == _pydicom(
                sop_class, instance, syntax
            ), (sop_class, syntax, instance)


@pytest.mark.parametrize(
    "instance", ["", "1.02.3", "1..2", "1.2.", "1.2.3 ", "2.25." + "1" * 60, "1.2.a", "١.٢"]
)
def test_a_value_it_does_not_vouch_for_goes_to_pydicom(instance: str) -> None:
    assert file_meta_bytes(US, instance, ExplicitVRLittleEndian) is None
    assert file_meta_bytes(None, "1.2.3", ExplicitVRLittleEndian) is None


def test_a_real_c_store_gives_pynetdicoms_own_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through a real association: the parts equal ``Event.encoded_dataset()``, and
    pydicom was not asked for them."""
    import pynetdicom.dsutils

    seen: list[tuple[bytes, bytes]] = []
    asked: list[object] = []
    original = pynetdicom.dsutils.encode_file_meta

    def counted(meta: Any) -> bytes:
        asked.append(meta)
        return original(meta)

    monkeypatch.setattr(pynetdicom.dsutils, "encode_file_meta", counted)

    def store(event: Any) -> int:
        with received_parts(event) as parts:
            got = b"".join(bytes(p) for p in parts)
        seen.append((got, event.encoded_dataset(True)))
        return 0x0000

    scp = AE(ae_title="SCP")
    scp.add_supported_context(US, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    server = scp.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, store)]
    )
    port = server.server_address[1]
    try:
        for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            scu = AE(ae_title="SCU")
            scu.add_requested_context(US, [syntax])
            assoc = scu.associate("127.0.0.1", port, ae_title="SCP")
            assert assoc.is_established
            for uid in ("1.2.3.4.5", generate_uid()):
                ds = Dataset()
                ds.SOPClassUID = US
                ds.SOPInstanceUID = uid
                ds.PatientID = "X"
                ds.file_meta = FileMetaDataset()
                ds.file_meta.TransferSyntaxUID = syntax
                assert assoc.send_c_store(ds).Status == 0x0000
            assoc.release()
    finally:
        server.shutdown()
    assert len(seen) == 4
    assert asked == [], "received_parts asked pydicom to encode the file meta"
    for got, expected in seen:
        assert got == expected
