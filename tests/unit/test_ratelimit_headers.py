"""Rate-limit response header formatting (pure functions)."""

from __future__ import annotations

import pytest

from ratelimit import headers
from ratelimit.model import Algorithm, Code, DescriptorStatus, Limit, Unit

MINUTE = Limit(100, Unit.MINUTE, name="per-minute")
DAILY = Limit(1000, Unit.DAY, name="daily")
UNNAMED = Limit(10, Unit.SECOND, window_units=5, algorithm=Algorithm.SLIDING_WINDOW)


def test_parse_mode() -> None:
    assert headers.parse_mode(" Both ") == "both"
    assert headers.parse_mode("off") == "off"
    with pytest.raises(ValueError, match="off, draft, classic, both"):
        headers.parse_mode("ietf")


def test_sf_string_escapes_and_keeps_ascii() -> None:
    assert headers.sf_string('a"b\\c') == '"a\\"b\\\\c"'
    assert headers.sf_string("caf\u00e9\n") == '"caf??"'


def test_draft_headers_list_every_policy_once_with_names_or_idents() -> None:
    statuses = [
        DescriptorStatus(Code.OK, MINUTE, 42, 16.2),
        DescriptorStatus(Code.OK),
        DescriptorStatus(Code.OK, DAILY, 958, 40117.0),
        DescriptorStatus(Code.OK, UNNAMED, 3, 0.0),
        DescriptorStatus(Code.OK, MINUTE, 41, 16.2),  # the same policy again: listed once
    ]
    assert headers.draft_headers(statuses) == (
        ("RateLimit-Policy", '"per-minute";q=100;w=60, "daily";q=1000;w=86400, "s5se10";q=10;w=5'),
        ("RateLimit", '"per-minute";r=42;t=17, "daily";r=958;t=40117, "s5se10";r=3;t=0'),
    )
    assert headers.draft_headers([DescriptorStatus(Code.OK)]) == ()


def test_classic_headers_lead_with_the_most_restrictive() -> None:
    statuses = [
        DescriptorStatus(Code.OK, DAILY, 5, 100.0),
        DescriptorStatus(Code.OK, UNNAMED, 3, 2.5),
        DescriptorStatus(Code.OK, UNNAMED, 3, 2.5),
    ]
    assert headers.classic_headers(statuses) == (
        ("X-RateLimit-Limit", '10, 1000;w=86400;name="daily", 10;w=5'),
        ("X-RateLimit-Remaining", "3"),
        ("X-RateLimit-Reset", "3"),
    )
    over = [DescriptorStatus(Code.OK, DAILY, 0, 9.0), DescriptorStatus(Code.OVER_LIMIT, MINUTE, 0, 30.0)]
    assert headers.classic_headers(over)[0] == (
        "X-RateLimit-Limit",
        '100, 1000;w=86400;name="daily", 100;w=60;name="per-minute"',
    )
    shadow = [DescriptorStatus(Code.OK, DAILY, 1, 9.0), DescriptorStatus(Code.OK, MINUTE, 0, 3.0, shadow=True)]
    assert headers.most_restrictive(shadow) == shadow[1]
    assert headers.classic_headers([DescriptorStatus(Code.OK)]) == ()


def test_response_headers_by_mode_and_retry_after() -> None:
    statuses = [DescriptorStatus(Code.OVER_LIMIT, MINUTE, 0, 0.2)]
    assert headers.response_headers("off", statuses, Code.OVER_LIMIT, 0.2) == ()
    draft = dict(headers.response_headers("draft", statuses, Code.OVER_LIMIT, 0.2))
    assert draft == {
        "RateLimit-Policy": '"per-minute";q=100;w=60',
        "RateLimit": '"per-minute";r=0;t=1',
        "Retry-After": "1",
    }
    classic = dict(headers.response_headers("classic", statuses, Code.OK))
    assert set(classic) == {"X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"}
    both = headers.response_headers("both", statuses, Code.OVER_LIMIT, 61.5)
    assert [name for name, _ in both] == [
        "RateLimit-Policy",
        "RateLimit",
        "X-RateLimit-Limit",
        "X-RateLimit-Remaining",
        "X-RateLimit-Reset",
        "Retry-After",
    ]
    assert both[-1] == ("Retry-After", "62")
