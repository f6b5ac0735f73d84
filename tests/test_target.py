from __future__ import annotations

import pytest

from boxfiles._target import TcpTarget, UnixTarget, parse_target


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:///run/box.sock", UnixTarget("/run/box.sock")),
        ("unix:rel/box.sock", UnixTarget("rel/box.sock")),
        ("unix:/abs/box.sock", UnixTarget("/abs/box.sock")),
        ("tcp://127.0.0.1:50051", TcpTarget("127.0.0.1", 50051)),
        ("localhost:7", TcpTarget("localhost", 7)),
        ("[::1]:9000", TcpTarget("::1", 9000)),
        ("tcp://[::1]:9000", TcpTarget("::1", 9000)),
    ],
)
def test_parse(text: str, expected: object) -> None:
    assert parse_target(text) == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("unix://rel.sock", "absolute"),
        ("unix:", "no socket path"),
        ("http://x:1", "scheme"),
        ("justahost", "host:port"),
        (":80", "host:port"),
        ("host:0", "1-65535"),
        ("host:70000", "1-65535"),
        ("host:http", "1-65535"),
        ("::1:80", "brackets"),
    ],
)
def test_bad_targets_are_named(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        parse_target(text)
    assert repr(text) in str(info.value)


def test_listen_address_may_ask_for_any_port() -> None:
    assert parse_target("127.0.0.1:0", listen=True) == TcpTarget("127.0.0.1", 0)
    with pytest.raises(ValueError, match="0-65535"):
        parse_target("127.0.0.1:65536", listen=True)


def test_loopback() -> None:
    assert TcpTarget("127.0.0.2", 1).is_loopback
    assert TcpTarget("localhost", 1).is_loopback
    assert TcpTarget("::1", 1).is_loopback
    assert not TcpTarget("0.0.0.0", 1).is_loopback
    assert not TcpTarget("example.com", 1).is_loopback
