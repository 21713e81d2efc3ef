"""Dictionaries as data files, and grammar validation with the Failed-AVP RFC 6733 §7 asks for."""

from __future__ import annotations

import struct
import textwrap
from pathlib import Path

import pytest

from eir.diameter.codec import Avp, decode_avps, encode_avp
from eir.diameter.constants import (APPLICATION_COMMON, APPLICATION_S13, AVP_FLAG_MANDATORY,
                                    AVP_FLAG_VENDOR, VENDOR_3GPP, ResultCode)
from eir.diameter.dictionary import (DEFAULT_DICTIONARY_DIR, AvpError, Dictionary,
                                     DictionaryError)

D = Dictionary.load()
E = D.encode
M, VM = AVP_FLAG_MANDATORY, AVP_FLAG_VENDOR | AVP_FLAG_MANDATORY
CER_GRAMMAR = D.command(APPLICATION_COMMON, 257).request
ECR_GRAMMAR = D.command(APPLICATION_S13, 324).request

# A tmp dictionary defining one new 3GPP AVP: the "adding an AVP is data only" case.
NEW_AVP_YAML = """\
avps:
  - {name: Test-Extension, code: 99999, vendor: 10415, type: Unsigned32, flags: VM}
"""


def avps_of(*encoded: bytes) -> list[Avp]:
    raw = b"".join(encoded)
    return decode_avps(raw, 0, len(raw))


def valid_ecr_avps(*extra: bytes, terminal: list[bytes] | None = None) -> list[Avp]:
    if terminal is None:
        terminal = [E("IMEI", "35209900176148"), E("Software-Version", "01")]
    return avps_of(E("Session-Id", "mme;1;1"), E("Auth-Session-State", 1),
                   E("Origin-Host", "mme.test"), E("Origin-Realm", "test"),
                   E("Destination-Realm", "test"), E("Terminal-Information", terminal),
                   E("User-Name", "001010123456789"), *extra)


def valid_cer_avps(*extra: bytes, skip: str = "") -> list[Avp]:
    parts = {"Origin-Host": E("Origin-Host", "mme.test"),
             "Origin-Realm": E("Origin-Realm", "test"),
             "Host-IP-Address": E("Host-IP-Address", "127.0.0.1"),
             "Vendor-Id": E("Vendor-Id", 0), "Product-Name": E("Product-Name", "t"),
             "Auth-Application-Id": E("Auth-Application-Id", APPLICATION_S13)}
    parts.pop(skip, None)
    return avps_of(*parts.values(), *extra)


def replaced(avps: list[Avp], new: bytes) -> list[Avp]:
    """`avps` with the AVP of the same code and vendor as `new` replaced by it."""
    [avp] = avps_of(new)
    return [avp if (a.code, a.vendor) == (avp.code, avp.vendor) else a for a in avps]


def validation_error(dictionary: Dictionary, avps: list[Avp], grammar) -> AvpError:
    with pytest.raises(AvpError) as caught:
        dictionary.validate(avps, grammar)
    return caught.value


def write_dictionary(directory: Path, text: str, name: str = "extra.yaml") -> Path:
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load_error(directory: Path) -> str:
    with pytest.raises(DictionaryError) as caught:
        Dictionary.load([DEFAULT_DICTIONARY_DIR, directory])
    return str(caught.value)


# -- loading -------------------------------------------------------------------------------

def test_default_dictionaries_load_base_and_s13():
    assert D.command(APPLICATION_COMMON, 257).name == "Capabilities-Exchange"
    assert D.command(APPLICATION_COMMON, 280) is not None
    assert D.command(APPLICATION_COMMON, 282) is not None
    ecr = D.command(APPLICATION_S13, 324)
    assert ecr.name == "ME-Identity-Check" and ecr.proxiable
    imei = D["IMEI"]
    assert (imei.code, imei.vendor, imei.type, imei.flags) == (1402, VENDOR_3GPP, "UTF8String",
                                                              VM)
    assert D["Equipment-Status"].values == {"WHITELISTED": 0, "BLACKLISTED": 1,
                                            "GREYLISTED": 2}
    assert D["Terminal-Information"].grammar is not None


def test_encode_by_name_uses_dictionary_code_vendor_and_flags():
    assert E("Equipment-Status", 1) == encode_avp(1445, VM, VENDOR_3GPP, b"\0\0\0\1")
    assert E("Equipment-Status", "GREYLISTED") == encode_avp(1445, VM, VENDOR_3GPP,
                                                            b"\0\0\0\2")
    assert E("Host-IP-Address", "::1") == encode_avp(257, M, 0, b"\0\2" + bytes(15) + b"\1")


def test_valid_requests_validate_and_are_indexed_by_name():
    found = D.validate(valid_ecr_avps(), ECR_GRAMMAR)
    assert found["User-Name"][0].data == b"001010123456789"
    assert len(D.validate(valid_cer_avps(), CER_GRAMMAR)["Origin-Host"]) == 1


@pytest.mark.parametrize("entry, names", [
    ("  - {name: Broken, code: 70000, type: Unsigned33}\n", ["avps[0]", "Broken", "type"]),
    ("  - {name: Broken, code: -1, type: Unsigned32}\n", ["avps[0]", "Broken", "code"]),
    ("  - {name: Broken, code: 70000, type: Unsigned32, flags: X}\n",
     ["avps[0]", "Broken", "flags"]),
    ("  - {name: Broken, code: 70000, type: Grouped}\n", ["avps[0]", "Broken", "grammar"]),
])
def test_bad_avp_entry_names_file_and_entry(tmp_path, entry, names):
    path = write_dictionary(tmp_path / "d", "avps:\n" + entry)
    message = load_error(tmp_path / "d")
    assert str(path) in message
    for name in names:
        assert name in message


@pytest.mark.parametrize("second_line, name", [
    ("{ No-Such-Avp }", "No-Such-Avp"),  # an AVP no dictionary defines
    ("{ Origin-Realm ]", "Origin-Realm"),  # a line that does not parse
], ids=["unknown AVP", "unreadable line"])
def test_bad_command_grammar_line_names_file_command_line_and_avp(tmp_path, second_line, name):
    path = write_dictionary(tmp_path / "d", f"""\
        commands:
          - name: Broken-Command
            code: 9000
            application: 0
            request: |
              {{ Origin-Host }}
              {second_line}
            answer: |
              {{ Result-Code }}
        """)
    message = load_error(tmp_path / "d")
    assert str(path) in message
    assert "Broken-Command" in message and "line 2" in message and name in message


@pytest.mark.parametrize("grammar_line, names", [
    ("{ No-Such-Avp }", ["No-Such-Avp"]),
    ("< Vendor-Id }", ["Vendor-Id"]),
])
def test_bad_grouped_avp_grammar_names_file_and_avp(tmp_path, grammar_line, names):
    path = write_dictionary(tmp_path / "d", f"""\
        avps:
          - name: Broken-Group
            code: 70001
            type: Grouped
            grammar: |
              {grammar_line}
        """)
    message = load_error(tmp_path / "d")
    assert "Broken-Group" in message
    for name in names:
        assert name in message
    assert str(path) in message  # the file to go and fix


def test_bad_yaml_names_file_and_line(tmp_path):
    path = write_dictionary(tmp_path / "d", "avps:\n  - {name: X, code: 1\n  - oops: [\n")
    message = load_error(tmp_path / "d")
    assert str(path) in message and "line" in message


def test_command_for_undeclared_application_is_refused(tmp_path):
    path = write_dictionary(tmp_path / "d", """\
        commands:
          - {name: Orphan, code: 9001, application: 4242, request: "", answer: ""}
        """)
    message = load_error(tmp_path / "d")
    assert str(path) in message and "Orphan" in message and "4242" in message


def test_missing_dictionary_directory_is_refused(tmp_path):
    message = load_error(tmp_path / "absent")
    assert str(tmp_path / "absent") in message


def test_new_vendor_avp_is_data_only(tmp_path):
    extension = encode_avp(99999, VM, VENDOR_3GPP, b"\0\0\0\7")
    before = validation_error(D, valid_ecr_avps(extension), ECR_GRAMMAR)
    assert before.result_code == ResultCode.AVP_UNSUPPORTED
    assert before.failed_avp == extension

    write_dictionary(tmp_path / "d", NEW_AVP_YAML)
    extended = Dictionary.load([DEFAULT_DICTIONARY_DIR, tmp_path / "d"])
    found = extended.validate(valid_ecr_avps(extension), ECR_GRAMMAR)
    assert found["Test-Extension"] == [Avp(99999, VM, VENDOR_3GPP, b"\0\0\0\7")]
    assert extended["Test-Extension"].decode(found["Test-Extension"][0].data) == 7
    # and its type is enforced: a 3-byte Unsigned32 is now 5014, not 5001
    short = encode_avp(99999, VM, VENDOR_3GPP, b"\0\0\7")
    assert validation_error(extended, valid_ecr_avps(short),
                            ECR_GRAMMAR).result_code == ResultCode.INVALID_AVP_LENGTH


# -- validation: result codes and Failed-AVP -----------------------------------------------

def test_unknown_avp_without_m_bit_is_ignored():
    D.validate(valid_ecr_avps(encode_avp(99999, 0, VENDOR_3GPP, b"x")), ECR_GRAMMAR)
    D.validate(valid_ecr_avps(encode_avp(60000, 0, 0, b"x")), ECR_GRAMMAR)


def test_5001_unknown_mandatory_avp_failed_avp_is_the_avp():
    unknown = encode_avp(60000, M, 0, b"abc")
    error = validation_error(D, valid_ecr_avps(unknown), ECR_GRAMMAR)
    assert error.result_code == ResultCode.AVP_UNSUPPORTED
    assert error.failed_avp == unknown


def test_5001_inside_grouped_is_wrapped_in_the_parent():
    unknown = encode_avp(60000, VM, VENDOR_3GPP, b"abc")
    terminal = [E("IMEI", "35209900176148"), unknown]
    error = validation_error(D, valid_ecr_avps(terminal=terminal), ECR_GRAMMAR)
    assert error.result_code == ResultCode.AVP_UNSUPPORTED
    assert error.failed_avp == encode_avp(1401, VM, VENDOR_3GPP, unknown)


@pytest.mark.parametrize("request_avps, grammar, bad", [
    (valid_ecr_avps, ECR_GRAMMAR, E("Auth-Session-State", 7)),  # not a defined value
    (valid_cer_avps, CER_GRAMMAR, encode_avp(264, M, 0, b"\xff\xfe")),  # not UTF-8
    (valid_cer_avps, CER_GRAMMAR, encode_avp(257, M, 0, b"\0\3" + bytes(4))),  # no such family
    (valid_cer_avps, CER_GRAMMAR, encode_avp(257, M, 0, b"\0\1" + bytes(3))),  # IPv4 too short
])
def test_5004_invalid_value_failed_avp_is_the_avp(request_avps, grammar, bad):
    error = validation_error(D, replaced(request_avps(), bad), grammar)
    assert error.result_code == ResultCode.INVALID_AVP_VALUE
    assert error.failed_avp == bad


@pytest.mark.parametrize("missing, empty_instance", [
    ("Origin-Host", encode_avp(264, M, 0, b"")),
    ("Vendor-Id", encode_avp(266, M, 0, bytes(4))),
    ("Host-IP-Address", encode_avp(257, M, 0, b"\0\1" + bytes(4))),
])
def test_5005_missing_avp_failed_avp_is_an_empty_instance(missing, empty_instance):
    error = validation_error(D, valid_cer_avps(skip=missing), CER_GRAMMAR)
    assert error.result_code == ResultCode.MISSING_AVP
    assert error.failed_avp == empty_instance


def test_5005_missing_vendor_avp_carries_its_vendor_id():
    avps = [a for a in valid_ecr_avps() if a.code != 1401]
    error = validation_error(D, avps, ECR_GRAMMAR)
    assert error.result_code == ResultCode.MISSING_AVP
    assert error.failed_avp == encode_avp(1401, VM, VENDOR_3GPP, b"")
    assert error.failed_avp[:12] == struct.pack("!III", 1401, (VM << 24) | 12, VENDOR_3GPP)


def test_5005_missing_avp_inside_grouped_is_wrapped_in_the_parent():
    group = E("Vendor-Specific-Application-Id", [E("Auth-Application-Id", APPLICATION_S13)])
    error = validation_error(D, valid_cer_avps(group), CER_GRAMMAR)
    assert error.result_code == ResultCode.MISSING_AVP
    assert error.failed_avp == encode_avp(260, M, 0, encode_avp(266, M, 0, bytes(4)))


def test_5008_avp_not_allowed_in_grouped_is_wrapped_in_the_parent():
    stray = E("Origin-Host", "x")
    group = E("Vendor-Specific-Application-Id", [E("Vendor-Id", VENDOR_3GPP), stray])
    error = validation_error(D, valid_cer_avps(group), CER_GRAMMAR)
    assert error.result_code == ResultCode.AVP_NOT_ALLOWED
    assert error.failed_avp == encode_avp(260, M, 0, stray)


def test_5008_avp_not_allowed_at_top_level_of_a_closed_grammar():
    stray = E("Origin-Host", "x")
    error = validation_error(D, avps_of(E("Vendor-Id", 1), stray),
                             D["Vendor-Specific-Application-Id"].grammar)
    assert error.result_code == ResultCode.AVP_NOT_ALLOWED
    assert error.failed_avp == stray


def test_5009_too_many_failed_avp_is_the_extra_occurrence():
    second = E("Origin-Host", "second.test")
    error = validation_error(D, valid_cer_avps(second), CER_GRAMMAR)
    assert error.result_code == ResultCode.AVP_OCCURS_TOO_MANY_TIMES
    assert error.failed_avp == second


def test_5009_inside_grouped_is_wrapped_in_the_parent():
    second = E("IMEI", "35332106470089")
    terminal = [E("IMEI", "35209900176148"), second]
    error = validation_error(D, valid_ecr_avps(terminal=terminal), ECR_GRAMMAR)
    assert error.result_code == ResultCode.AVP_OCCURS_TOO_MANY_TIMES
    assert error.failed_avp == encode_avp(1401, VM, VENDOR_3GPP, second)


def test_5014_wrong_payload_length_failed_avp_is_the_avp():
    short = encode_avp(277, M, 0, b"\0\0\1")  # Enumerated needs 4 bytes
    error = validation_error(D, replaced(valid_ecr_avps(), short), ECR_GRAMMAR)
    assert error.result_code == ResultCode.INVALID_AVP_LENGTH
    assert error.failed_avp == short


def test_5014_overrunning_child_is_header_with_zero_payload_inside_parent():
    # A Vendor-Id whose length field says 40 inside a 12-byte payload.
    child = struct.pack("!II", 266, (M << 24) | 40) + b"\0\0\0\1"
    group = encode_avp(260, M, 0, child)
    error = validation_error(D, valid_cer_avps(group), CER_GRAMMAR)
    assert error.result_code == ResultCode.INVALID_AVP_LENGTH
    assert error.failed_avp == encode_avp(260, M, 0, encode_avp(266, M, 0, bytes(4)))


def test_5014_nested_two_levels_keeps_both_parents():
    child = struct.pack("!II", 266, (M << 24) | 4)  # length below the header size
    inner = encode_avp(284, M, 0, E("Proxy-Host", "p") + E("Proxy-State", b"s")
                       + encode_avp(260, M, 0, child))
    error = validation_error(D, valid_ecr_avps(inner), ECR_GRAMMAR)
    assert error.result_code == ResultCode.INVALID_AVP_LENGTH
    assert error.failed_avp == encode_avp(
        284, M, 0, encode_avp(260, M, 0, encode_avp(266, M, 0, bytes(4))))
