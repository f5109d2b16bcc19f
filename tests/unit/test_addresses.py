"""The plain-address shortcut: an address it takes as it stands is one email-validator
accepts unchanged, with the same local part and domain - else the API would store, or
the worker send to, something email-validator would not have made of it."""

from __future__ import annotations

import pytest
from email_validator import validate_email
from hypothesis import given, settings
from hypothesis import strategies as st

from services.api.schemas import validated_address
from services.core.addresses import is_plain_address, plain_address

_ATEXT_CHARS = "abcXYZ019_!#$%&'*+-/=?^`{|}~"
_ODD_LABELS = ["xn--bcher-kva", "ab--cd", "-a", "a-", "Example", "a" * 63, "a" * 64]
_ODD_TOP_LABELS = ["COM", "c1", "123", "xn--p1ai", "localhost", "test", "arpa", "invalid"]
_ODD_TOP_LABELS += ["local", "onion", "example", "a" * 63, "a" * 64]


@st.composite
def addresses(draw: st.DrawFn) -> str:
    """Plain addresses, half of them changed in one of the ways that may make them not so."""
    atoms = draw(st.lists(st.text(_ATEXT_CHARS, min_size=1, max_size=12), min_size=1, max_size=4))
    local = ".".join(atoms)
    label = st.from_regex(r"[a-z0-9]+(-[a-z0-9]+)?", fullmatch=True).filter(lambda x: len(x) < 12)
    labels = [*draw(st.lists(label, min_size=1, max_size=3)), draw(st.text("abcz", min_size=1))]
    change = draw(st.integers(0, 9))
    if change == 1:
        labels[-1] = draw(st.sampled_from(_ODD_TOP_LABELS))
    elif change == 2:
        labels.insert(draw(st.integers(0, len(labels) - 1)), draw(st.sampled_from(_ODD_LABELS)))
    elif change == 3:  # at the local part's limit, or past it
        local = draw(st.sampled_from(["a" * 64, "b" * 65]))
    elif change == 4:  # the whole near its limit of 254
        labels = ["d" * 62] * 3 + labels
    elif change == 5:  # no dot after the @
        labels = labels[-1:]
    return f"{local}@{'.'.join(labels)}"


@given(address=addresses())
@settings(max_examples=1000, deadline=None)
def test_a_plain_address_is_one_email_validator_returns_unchanged(address: str) -> None:
    plain = plain_address(address)
    if plain is None:
        return
    assert is_plain_address(address)
    assert_as_email_validator_has_it(address, plain)


def assert_as_email_validator_has_it(address: str, plain: tuple[str, str]) -> None:
    """What the API stores (the address, unchanged) and what the worker takes apart (its
    local part and ASCII domain) is what email-validator makes of it."""
    valid = validate_email(address, check_deliverability=False, allow_display_name=True)
    assert (valid.local_part, valid.ascii_domain) == plain
    assert not valid.display_name
    assert valid.normalized == address
    assert validated_address(address) == address


@pytest.mark.parametrize(
    ("address", "plain"),
    [
        ("alice@example.org", True),
        ("o'brien+tag@mail.example.co.uk", True),
        ("a" * 64 + "@example.com", True),
        ("a" * 65 + "@example.com", False),  # too long before the @
        ("a@" + "b" * 63 + ".com", True),
        ("a@" + "b" * 64 + ".com", False),  # a label longer than 63
        ("a@" + ".".join(["b" * 62] * 4) + ".c", False),  # longer than 254
        ("a@" + ".".join(["b" * 62] * 4) + "c", True),  # 254
        ("a@b.c1", False),  # a top-level domain ends with a letter
        ("a@xn--bcher-kva.example", False),  # Punycode: email-validator decodes it
        ("a@ab--cd.example", False),
        ("a@mail.localhost", False),  # special-use
        ("a@Example.org", False),  # email-validator lowercases the domain
        ("a@localhost", False),
        ("Alice <alice@example.org>", False),
        ("a..b@example.org", False),
        ("a@example.org.", False),
    ],
)
def test_what_counts_as_plain(address: str, plain: bool) -> None:
    parts = plain_address(address)
    assert is_plain_address(address) is plain is (parts is not None)
    if parts is not None:
        assert_as_email_validator_has_it(address, parts)
