"""The plain-address shortcut, shared by the API (validating) and the worker (parsing).

email-validator takes 20-100 us per address. Most addresses have one shape: a dot-atom
local part and a lowercase domain of two or more LDH labels (no dash at either end, none
doubled: so no Punycode). Such an address, within the lengths below and outside the
special-use names, is one email-validator accepts and returns unchanged - local part,
domain and normalized form (tests/unit/test_addresses.py holds the two equal) - so both
take it as it is, in about 2 us, and leave everything else to email-validator.
"""

from __future__ import annotations

import re

from email_validator import SPECIAL_USE_DOMAIN_NAMES

MAX_LOCAL_PART_OCTETS = 64  # RFC 5321 4.5.3.1.1; email-validator lets longer ones pass

_ATEXT = r"[A-Za-z0-9_!#$%&'*+\-/=?^`{|}~]+"
_LABEL = r"[a-z0-9]+(?:-[a-z0-9]+)*"
_PLAIN_ADDRESS = re.compile(rf"({_ATEXT}(?:\.{_ATEXT})*)@((?:{_LABEL}\.)+{_LABEL})")
_MAX_PLAIN_ADDRESS = 254  # RFC 5321's path limit, as email-validator applies it
_MAX_LABEL = 63  # (253 for the domain follows from the 254 of the whole)
_SPECIAL_USE_SUFFIXES = tuple(f".{name}" for name in SPECIAL_USE_DOMAIN_NAMES)


def plain_address(value: str) -> tuple[str, str] | None:
    """(local part, domain) when ``value`` is an address email-validator would accept as
    it stands, else None."""
    match = _PLAIN_ADDRESS.fullmatch(value)
    if match is None or len(value) > _MAX_PLAIN_ADDRESS:
        return None
    local, domain = match.groups()
    labels = domain.split(".")
    if (
        len(local) <= MAX_LOCAL_PART_OCTETS
        and all(len(label) <= _MAX_LABEL for label in labels)
        and labels[-1][-1].isalpha()  # a top-level domain ends with a letter
        and not f".{domain}".endswith(_SPECIAL_USE_SUFFIXES)
    ):
        return local, domain
    return None


def is_plain_address(value: str) -> bool:
    """True when ``value`` is an address email-validator would accept as it stands."""
    return plain_address(value) is not None
