"""docs/5G.md's AMF side against Open5GS's AMF code (pull request 4708, read, not run): the
`amf.eir` keys its src/amf/context.c parses, and what its requests carry."""

from __future__ import annotations

import re

import yaml
from helpers_process import ROOT

# src/amf/context.c of open5gs/open5gs pull request 4708 (head 6b47f1a): the keys under
# `amf.eir` (any other: "unknown key"), each action `allow` (default) or `reject`.
AMF_EIR_KEYS = {"enabled", "unknown_action", "failure_action", "missing_pei_action"}
AMF_EIR_ACTIONS = {"allow", "reject"}

DOC = ROOT / "docs" / "5G.md"


def amf_eir_sections(text: str) -> list[dict]:
    """The `amf: eir:` sections of the YAML blocks of a Markdown text."""
    sections = []
    for block in re.findall(r"```yaml\n(.*?)```", text, flags=re.S):
        document = yaml.safe_load(block) or {}
        if isinstance(document, dict) and isinstance(document.get("amf"), dict) \
                and "eir" in document["amf"]:
            sections.append(document["amf"]["eir"])
    return sections


def test_amf_eir_keys_in_the_doc_are_those_the_amf_parses():
    text = DOC.read_text(encoding="utf-8")
    sections = amf_eir_sections(text)
    assert sections, "docs/5G.md has no amf.yaml example with an eir: section"
    for section in sections:
        assert set(section) == AMF_EIR_KEYS, sorted(section)
        for key, value in section.items():
            if key.endswith("_action"):
                assert value in AMF_EIR_ACTIONS, (key, value)
    assert "src/amf/context.c" in text


def test_the_doc_says_what_the_amfs_requests_carry():
    text = " ".join(DOC.read_text(encoding="utf-8").split())
    assert "`imeisv-` + 16 digits, the IMEISV the UE gave in Security Mode Complete" in text
    assert "`User-Agent: AMF`" in text
    assert "`missing_pei_action`" in text
