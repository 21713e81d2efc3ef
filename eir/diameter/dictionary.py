"""Diameter dictionaries loaded from data files (dictionaries/*.yaml), and validation.

A dictionary knows every AVP (code, vendor, type, flags, enumerated values, grouped grammar)
and every command (code, application, proxiable, request and answer grammar). Validation of
a received AVP list against a grammar raises `AvpError` carrying the Result-Code and the
Failed-AVP contents that RFC 6733 §7 asks for.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from eir.diameter.codec import Avp, AvpCountError, AvpLengthError, decode_avps, encode_avp
from eir.diameter.constants import AVP_FLAG_MANDATORY, AVP_FLAG_VENDOR, ResultCode


def _default_dictionary_dir() -> Path:
    """dictionaries/ of the source tree, else the copy installed as package data."""
    package = Path(__file__).resolve().parent.parent
    source_tree = package.parent / "dictionaries"
    return source_tree if source_tree.is_dir() else package / "dictionaries"


DEFAULT_DICTIONARY_DIR = _default_dictionary_dir()

_U32 = struct.Struct("!I")
_I32 = struct.Struct("!i")
_U64 = struct.Struct("!Q")
_I64 = struct.Struct("!q")
_F32 = struct.Struct("!f")
_F64 = struct.Struct("!d")

# Payload length of fixed-size types; a different length is 5014 DIAMETER_INVALID_AVP_LENGTH.
_FIXED_LENGTH = {
    "Unsigned32": 4, "Integer32": 4, "Float32": 4, "Enumerated": 4, "Time": 4,
    "Unsigned64": 8, "Integer64": 8, "Float64": 8,
}
_STRING_TYPES = {"UTF8String", "DiameterIdentity", "DiameterURI"}
TYPES = set(_FIXED_LENGTH) | _STRING_TYPES | {"OctetString", "Address", "Grouped"}

# What `Dictionary.validate` checks of a payload, by AVP type: it tests the common valid
# case inline and calls `AvpDef.check` (which raises with the right Result-Code) only when
# that test fails, so that a valid request makes no call per AVP.
(CHECK_NOTHING, CHECK_LENGTH, CHECK_ENUMERATED, CHECK_STRING, CHECK_ADDRESS, CHECK_GROUPED,
 CHECK_IDENTITY) = range(7)

# A DiameterIdentity is an FQDN (RFC 6733 §4.3.1), in ASCII (an IDN as A-labels, Appendix
# D): dot-separated labels of 1..63 letters, digits and hyphens, neither first nor last a
# hyphen, at most 255 bytes in all. Underscores are accepted too (some vendors' host names
# have them); anything else -- spaces, control characters, escapes -- is 5004.
IDENTITY = re.compile(rb"(?=.{1,255}\Z)(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                      rb"(?:\.(?!\Z)|\Z))+")
# Identities seen valid recently: most requests repeat a handful (their Origin-Host and
# -Realm, our realm), so a set look-up replaces the pattern match. Bounded: once full, the
# others are matched each time.
KNOWN_IDENTITIES_MAX = 4096
_known_identities: set[bytes] = set()

# Grouped AVPs nested deeper than this are refused (5004): a grammar with *[ AVP ] (Proxy-Info,
# Failed-AVP) lets a Grouped AVP hold itself, and a 64 KiB message of nested headers would
# otherwise recurse past Python's stack limit (RecursionError). Real dictionaries nest ~5 deep.
MAX_GROUPED_DEPTH = 16
# The Error-Message of 5009 for a message with more AVPs than the server accepts
# (diameter.max_avps_per_message, enforced by eir.diameter.peer with `Dictionary.validate`).
TOO_MANY_AVPS = "more AVPs in the message than accepted"


class DictionaryError(Exception):
    """A dictionary file is wrong; the message names the file and the entry."""


class AvpError(Exception):
    """A received AVP list breaks the dictionary: answer `result_code` with `failed_avp`."""

    def __init__(self, result_code: ResultCode, failed_avp: bytes | None, text: str):
        super().__init__(text)
        self.result_code = result_code
        self.failed_avp = failed_avp
        self.text = text


class AvpIndex(dict):
    """Validated AVPs by name (name → occurrences, in order). `groups` holds, for each
    Grouped AVP, the index of each occurrence's children, so nothing is decoded twice.
    `count`: the AVPs indexed, at every depth (what they cost to decode and validate)."""

    __slots__ = ("groups", "count")

    def __init__(self) -> None:
        # dict.__init__ is not called: with no arguments it does nothing (hot path: two
        # indexes per request).
        self.groups: dict[str, list[AvpIndex]] = {}
        self.count = 0


def avp_key(code: int, vendor: int) -> int:
    return (vendor << 32) | code


@dataclass(frozen=True, eq=False)
class GrammarRule:
    avp: "AvpDef | None"  # None is the "AVP" wildcard
    min: int
    max: int | None  # None: unbounded


@dataclass(eq=False)
class Grammar:
    rules: dict[int, GrammarRule] = field(default_factory=dict)
    required: list[GrammarRule] = field(default_factory=list)
    allows_any: bool = False


@dataclass(eq=False)
class AvpDef:
    name: str
    code: int
    vendor: int
    type: str
    flags: int
    values: dict[str, int] = field(default_factory=dict)
    grammar: Grammar | None = None
    _grammar_text: str = ""
    _where: str = ""  # file and entry it was defined in, for errors in its grammar

    def __post_init__(self) -> None:
        # Precomputed once: `check` runs for every AVP of every request.
        self.key = avp_key(self.code, self.vendor)
        self.fixed_length = _FIXED_LENGTH.get(self.type)
        self.value_set = frozenset(self.values.values()) if self.values else None
        self.is_string = self.type in _STRING_TYPES
        self.is_address = self.type == "Address"
        if self.type == "Grouped":
            self.check_kind = CHECK_GROUPED
        elif self.type == "DiameterIdentity":
            self.check_kind = CHECK_IDENTITY
        elif self.value_set is not None:
            self.check_kind = CHECK_ENUMERATED
        elif self.fixed_length is not None:
            self.check_kind = CHECK_LENGTH
        elif self.is_string:
            self.check_kind = CHECK_STRING
        elif self.is_address:
            self.check_kind = CHECK_ADDRESS
        else:
            self.check_kind = CHECK_NOTHING

    def check(self, avp: Avp) -> None:
        """Raise AvpError if the payload is not a valid value of this AVP's type."""
        data = avp.data
        fixed = self.fixed_length
        if fixed is not None:
            if len(data) != fixed:
                raise AvpError(ResultCode.INVALID_AVP_LENGTH, avp.encode(),
                               f"{self.name}: payload of {len(data)} bytes, "
                               f"{self.type} needs {fixed}")
            if self.value_set is not None and _U32.unpack(data)[0] not in self.value_set:
                raise AvpError(ResultCode.INVALID_AVP_VALUE, avp.encode(),
                               f"{self.name}: {_U32.unpack(data)[0]} is not a defined value")
        elif self.check_kind == CHECK_IDENTITY:
            if IDENTITY.fullmatch(data) is None:
                raise AvpError(ResultCode.INVALID_AVP_VALUE, avp.encode(),
                               f"{self.name}: not a DiameterIdentity (an FQDN, RFC 6733 "
                               "§4.3.1)")
            if len(_known_identities) < KNOWN_IDENTITIES_MAX:
                _known_identities.add(data)
        elif self.is_string and not data.isascii():  # ASCII is valid UTF-8: skip decoding
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                raise AvpError(ResultCode.INVALID_AVP_VALUE, avp.encode(),
                               f"{self.name}: not valid UTF-8") from None
        elif self.is_address:
            if not (len(data) == 6 and data[:2] == b"\0\1"
                    or len(data) == 18 and data[:2] == b"\0\2"):
                raise AvpError(ResultCode.INVALID_AVP_VALUE, avp.encode(),
                               f"{self.name}: not an IPv4 or IPv6 Address")

    def decode(self, data: bytes) -> Any:
        t = self.type
        if t in ("Unsigned32", "Enumerated", "Time"):
            return _U32.unpack(data)[0]
        if t == "Integer32":
            return _I32.unpack(data)[0]
        if t == "Unsigned64":
            return _U64.unpack(data)[0]
        if t == "Integer64":
            return _I64.unpack(data)[0]
        if t == "Float32":
            return _F32.unpack(data)[0]
        if t == "Float64":
            return _F64.unpack(data)[0]
        if t in _STRING_TYPES:
            return data.decode("utf-8")
        if t == "Address":
            return ipaddress.ip_address(data[2:])
        if t == "Grouped":
            return decode_avps(data, 0, len(data))
        return bytes(data)

    def encode_value(self, value: Any) -> bytes:
        t = self.type
        if t in ("Unsigned32", "Enumerated", "Time"):
            if isinstance(value, str):
                value = self.values[value]
            return _U32.pack(value)
        if t == "Integer32":
            return _I32.pack(value)
        if t == "Unsigned64":
            return _U64.pack(value)
        if t == "Integer64":
            return _I64.pack(value)
        if t == "Float32":
            return _F32.pack(value)
        if t == "Float64":
            return _F64.pack(value)
        if t in _STRING_TYPES:
            return value.encode("utf-8") if isinstance(value, str) else bytes(value)
        if t == "Address":
            address = ipaddress.ip_address(value)
            family = b"\0\1" if address.version == 4 else b"\0\2"
            return family + address.packed
        if t == "Grouped":
            return b"".join(value)
        return bytes(value)

    def empty_instance(self) -> bytes:
        """The AVP with a zero value of minimum length: Failed-AVP contents for 5005."""
        if self.type == "Address":
            payload = b"\0\1\0\0\0\0"
        else:
            payload = bytes(_FIXED_LENGTH.get(self.type, 0))
        return encode_avp(self.code, self.flags, self.vendor, payload)


@dataclass(eq=False)
class CommandDef:
    name: str
    code: int
    application: int
    proxiable: bool
    request: Grammar
    answer: Grammar


_GRAMMAR_LINE = re.compile(
    r"^\s*(?:(\d*)\s*\*\s*(\d*))?\s*([<{\[])\s*([A-Za-z0-9][A-Za-z0-9-]*)\s*([>}\]])\s*$")
_CLOSERS = {"<": ">", "{": "}", "[": "]"}


class Dictionary:
    def __init__(self) -> None:
        self.avps: dict[int, AvpDef] = {}
        self.avps_by_name: dict[str, AvpDef] = {}
        self.commands: dict[tuple[int, int], CommandDef] = {}
        self.applications: dict[int, str] = {}

    # -- loading -------------------------------------------------------------------------

    @classmethod
    def load(cls, directories: Iterable[Path | str] = (DEFAULT_DICTIONARY_DIR,)) -> "Dictionary":
        """Load every *.yaml file of the given directories (in name order) into one dictionary."""
        dictionary = cls()
        pending_commands: list[tuple[str, int, dict]] = []
        files = []
        for directory in directories:
            directory = Path(directory)
            if not directory.is_dir():
                raise DictionaryError(f"{directory}: dictionary directory not found")
            files.extend(sorted(directory.glob("*.yaml")))
        if not files:
            raise DictionaryError("no dictionary files found")
        for path in files:
            try:
                document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise DictionaryError(f"{path}: {exc}") from None
            if not isinstance(document, dict):
                raise DictionaryError(f"{path}: expected a mapping at top level")
            for index, entry in enumerate(document.get("applications") or []):
                where = f"{path}: applications[{index}]"
                app_id = _int(entry, "id", where)
                dictionary.applications[app_id] = str(entry.get("name", app_id))
            for index, entry in enumerate(document.get("avps") or []):
                dictionary._add_avp(entry, f"{path}: avps[{index}]")
            for index, entry in enumerate(document.get("commands") or []):
                pending_commands.append((f"{path}: commands[{index}]", index, entry))
        # Grammars refer to AVPs by name, possibly defined in a later file: resolve last.
        for avp in dictionary.avps.values():
            if avp.type == "Grouped":
                avp.grammar = dictionary._grammar(avp._grammar_text, f"{avp._where}: grammar")
        for where, _, entry in pending_commands:
            dictionary._add_command(entry, where)
        return dictionary

    def _add_avp(self, entry: dict, where: str) -> None:
        if not isinstance(entry, dict):
            raise DictionaryError(f"{where}: expected a mapping")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise DictionaryError(f"{where}: name: missing")
        where = f"{where} ({name})"
        code = _int(entry, "code", where)
        vendor = int(entry.get("vendor", 0) or 0)
        avp_type = entry.get("type")
        if avp_type not in TYPES:
            raise DictionaryError(f"{where}: type: {avp_type!r} is not one of {sorted(TYPES)}")
        flag_text = str(entry.get("flags", "M") or "")
        if set(flag_text) - set("VM"):
            raise DictionaryError(f"{where}: flags: {flag_text!r} may hold only V and M")
        flags = (AVP_FLAG_MANDATORY if "M" in flag_text else 0) | (
            AVP_FLAG_VENDOR if vendor else 0)
        values = entry.get("values") or {}
        if values and avp_type != "Enumerated":
            raise DictionaryError(f"{where}: values: only Enumerated AVPs have values")
        grammar_text = entry.get("grammar") or ""
        if avp_type == "Grouped" and not grammar_text:
            raise DictionaryError(f"{where}: grammar: a Grouped AVP needs one")
        definition = AvpDef(name, code, vendor, avp_type, flags,
                            {str(k): int(v) for k, v in values.items()},
                            _grammar_text=grammar_text, _where=where)
        existing = self.avps.get(definition.key)
        if existing is not None and existing.name != name:
            raise DictionaryError(
                f"{where}: code {code} vendor {vendor} is already defined as {existing.name}")
        if name in self.avps_by_name and self.avps_by_name[name].key != definition.key:
            raise DictionaryError(f"{where}: name {name} is already used by another code")
        self.avps[definition.key] = definition
        self.avps_by_name[name] = definition

    def _add_command(self, entry: dict, where: str) -> None:
        name = entry.get("name") or "?"
        where = f"{where} ({name})"
        code = _int(entry, "code", where)
        application = _int(entry, "application", where)
        if application not in self.applications:
            raise DictionaryError(f"{where}: application: {application} is not declared")
        command = CommandDef(
            name, code, application, bool(entry.get("proxiable", False)),
            self._grammar(entry.get("request") or "", f"{where}: request"),
            self._grammar(entry.get("answer") or "", f"{where}: answer"))
        self.commands[(application, code)] = command

    def _grammar(self, text: str, where: str) -> Grammar:
        grammar = Grammar()
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            match = _GRAMMAR_LINE.match(line)
            if not match or _CLOSERS[match.group(3)] != match.group(5):
                raise DictionaryError(f"{where}, line {number}: cannot read {line.strip()!r}")
            low, high, opener, name, _ = match.groups()
            repeated = match.group(0).count("*") > 0
            required = opener in "<{"
            minimum = int(low) if low else (1 if required else 0)
            maximum = int(high) if high else (None if repeated else 1)
            if name == "AVP":
                grammar.allows_any = True
                continue
            avp = self.avps_by_name.get(name)
            if avp is None:
                raise DictionaryError(f"{where}, line {number}: unknown AVP {name}")
            rule = GrammarRule(avp, minimum, maximum)
            grammar.rules[avp.key] = rule
            if minimum:
                grammar.required.append(rule)
        return grammar

    # -- use -----------------------------------------------------------------------------

    def __getitem__(self, name: str) -> AvpDef:
        return self.avps_by_name[name]

    def encode(self, name: str, value: Any) -> bytes:
        """A whole AVP, by name, with the flags the dictionary gives it."""
        definition = self.avps_by_name[name]
        return encode_avp(definition.code, definition.flags, definition.vendor,
                          definition.encode_value(value))

    def command(self, application: int, code: int) -> CommandDef | None:
        return self.commands.get((application, code))

    def validate(self, avps: list[Avp], grammar: Grammar, depth: int = 0,
                 budget: int = 1 << 24) -> AvpIndex:
        """Check `avps` against `grammar` (recursing into Grouped AVPs) and index them by name.

        Raises AvpError for the first problem found: 5001 unknown AVP with the M bit,
        5004 invalid value, 5014 invalid length, 5008 AVP not allowed, 5009 too many (of
        one AVP, or more than `budget` AVPs inside the Grouped ones, at every depth: each
        costs ~1 µs), and after the whole list, 5005 for a missing required AVP.
        """
        found = AvpIndex()
        left = budget
        groups = found.groups
        rules = grammar.rules
        known = self.avps
        known_identities = _known_identities
        for avp in avps:
            code, flags, vendor, data = avp
            key = (vendor << 32) | code
            rule = rules.get(key)
            if rule is not None:
                definition = rule.avp
            else:
                definition = known.get(key)
                if definition is None:
                    if flags & AVP_FLAG_MANDATORY:
                        raise AvpError(ResultCode.AVP_UNSUPPORTED, avp.encode(),
                                       f"AVP {code} (vendor {vendor}) is not supported")
                    continue
                if not grammar.allows_any:
                    raise AvpError(ResultCode.AVP_NOT_ALLOWED, avp.encode(),
                                   f"{definition.name} is not allowed here")
            kind = definition.check_kind
            # The valid case tested inline; `check` raises the error otherwise.
            if kind == CHECK_STRING:
                if not data.isascii():
                    definition.check(avp)
            elif kind == CHECK_IDENTITY:
                if data not in known_identities:
                    definition.check(avp)
            elif kind == CHECK_ENUMERATED:
                if len(data) != 4 or _U32.unpack(data)[0] not in definition.value_set:
                    definition.check(avp)
            elif kind == CHECK_GROUPED:
                children = self._validate_grouped(avp, definition, depth, left)
                left -= children.count
                group = groups.get(definition.name)
                if group is None:
                    groups[definition.name] = [children]
                else:
                    group.append(children)
            elif kind == CHECK_LENGTH:
                if len(data) != definition.fixed_length:
                    definition.check(avp)
            elif kind == CHECK_ADDRESS:
                definition.check(avp)
            name = definition.name
            same = found.get(name)
            if same is None:
                found[name] = [avp]
            else:
                same.append(avp)
                if rule is not None and rule.max is not None and len(same) > rule.max:
                    raise AvpError(ResultCode.AVP_OCCURS_TOO_MANY_TIMES, avp.encode(),
                                   f"{name} occurs more than {rule.max} time(s)")
        for rule in grammar.required:
            if rule.avp.name not in found or len(found[rule.avp.name]) < rule.min:
                raise AvpError(ResultCode.MISSING_AVP, rule.avp.empty_instance(),
                               f"{rule.avp.name} is missing")
        found.count = len(avps) + budget - left
        return found

    def _validate_grouped(self, avp: Avp, definition: AvpDef, depth: int,
                          budget: int) -> AvpIndex:
        if depth >= MAX_GROUPED_DEPTH:
            raise AvpError(ResultCode.INVALID_AVP_VALUE, avp.encode(),
                           f"{definition.name}: Grouped AVPs nested more than "
                           f"{MAX_GROUPED_DEPTH} deep")
        try:
            children = decode_avps(avp.data, 0, len(avp.data), budget)
            return self.validate(children, definition.grammar, depth + 1,
                                 budget - len(children))
        except AvpCountError as exc:
            # RFC 6733 §7.1.5: Failed-AVP holds the first AVP beyond the bound, inside the
            # Grouped AVP around it (§7.5), as for the errors below.
            raise AvpError(ResultCode.AVP_OCCURS_TOO_MANY_TIMES,
                           encode_avp(avp.code, avp.flags, avp.vendor, exc.failed.encode()),
                           f"{definition.name}: {TOO_MANY_AVPS}") from None
        except AvpLengthError as exc:
            inner = self.failed_for_length_error(exc)
            raise AvpError(ResultCode.INVALID_AVP_LENGTH,
                           encode_avp(avp.code, avp.flags, avp.vendor, inner),
                           f"{definition.name}: {exc}") from None
        except AvpError as exc:
            # RFC 6733 §7.5: the Failed-AVP may hold the Grouped AVP around the offender.
            raise AvpError(exc.result_code,
                           encode_avp(avp.code, avp.flags, avp.vendor, exc.failed_avp),
                           f"{definition.name}: {exc.text}") from None

    def failed_for_length_error(self, exc: AvpLengthError) -> bytes:
        """Failed-AVP contents for 5014: the offending header and a zero payload (§7.1.5)."""
        definition = self.avps.get(avp_key(exc.code, exc.vendor))
        if definition is not None:
            payload = b"" if definition.type == "Grouped" else bytes(
                _FIXED_LENGTH.get(definition.type, 0))
        else:
            payload = b""
        return encode_avp(exc.code, exc.flags, exc.vendor, payload)


def _int(entry: dict, key: str, where: str) -> int:
    value = entry.get(key) if isinstance(entry, dict) else None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DictionaryError(f"{where}: {key}: expected a non-negative integer, got {value!r}")
    return value
