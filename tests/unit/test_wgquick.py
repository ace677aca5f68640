"""wg-quick files: what parses, what is refused (with the line), and that nothing else is raised."""

from __future__ import annotations

import base64
import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from punchtrio.cli import main
from punchtrio.tunnel import DEFAULT_MTU, ConfigError, load_wgquick, parse_wgquick

PRIV = base64.b64encode(bytes(range(1, 33))).decode()
PUB1 = base64.b64encode(bytes(range(2, 34))).decode()
PUB2 = base64.b64encode(bytes(range(3, 35))).decode()
PSK = base64.b64encode(bytes(range(4, 36))).decode()

FULL = f"""\
# a comment line
[Interface]
PrivateKey = {PRIV}
Address = 10.0.0.1/24, fd00::1/64
Address = 10.1.0.1
ListenPort = 51820
MTU = 1380

[Peer]  # trailing comment
PublicKey = {PUB1}
PresharedKey = {PSK}
AllowedIPs = 10.0.0.2/32, fd00::2/128
AllowedIPs = 192.168.7.9/24
Endpoint = 192.0.2.7:51821
PersistentKeepalive = 25

[peer]
publickey={PUB2}
endpoint=[2001:db8::9]:4500
persistentkeepalive = off
"""


def test_full_file() -> None:
    config = parse_wgquick(FULL)
    iface = config.interface
    assert iface.private_key == bytes(range(1, 33))
    assert iface.addresses == (
        ipaddress.ip_interface("10.0.0.1/24"),
        ipaddress.ip_interface("fd00::1/64"),
        ipaddress.ip_interface("10.1.0.1/32"),
    )
    assert iface.listen_port == 51820
    assert iface.mtu == 1380
    first, second = config.peers
    assert first.public_key == bytes(range(2, 34))
    assert first.preshared_key == bytes(range(4, 36))
    assert first.allowed_ips == (
        ipaddress.ip_network("10.0.0.2/32"),
        ipaddress.ip_network("fd00::2/128"),
        ipaddress.ip_network("192.168.7.0/24"),
    )
    assert first.endpoint == ("192.0.2.7", 51821)
    assert first.persistent_keepalive == 25
    assert first.line == 9
    assert second.endpoint == ("2001:db8::9", 4500)
    assert second.persistent_keepalive is None
    assert second.allowed_ips == ()


def test_defaults_and_secrets_hidden() -> None:
    config = parse_wgquick(
        f"[Interface]\nPrivateKey={PRIV}\n[Peer]\nPublicKey={PUB1}\nPresharedKey={PSK}"
    )
    assert config.interface.mtu == DEFAULT_MTU == 1420
    assert config.interface.listen_port is None
    assert config.interface.addresses == ()
    assert PRIV not in repr(config)
    assert "private_key" not in repr(config)
    assert "preshared_key" not in repr(config)


@pytest.mark.parametrize(
    ("body", "line", "message"),
    [
        (f"[Interface]\nPrivateKey={PRIV}\nDNS = 1.1.1.1\n", 3, "DNS is not supported"),
        (f"[Interface]\nPrivateKey={PRIV}\nColour = red\n", 3, "unknown key 'colour'"),
        (f"[Interface]\nPrivateKey={PRIV}\nPublicKey = {PUB1}\n", 3, "unknown key PublicKey"),
        (f"PrivateKey={PRIV}\n", 1, "outside a section"),
        (f"[Interface]\nPrivateKey={PRIV}\n[Peers]\n", 3, "unknown section"),
        (f"[Interface]\nPrivateKey={PRIV}\njust words\n", 3, "expected 'Key = Value'"),
        ("[Interface]\nPrivateKey = not-base64!\n", 2, "PrivateKey is not valid base64"),
        ("[Interface]\nPrivateKey = AAAA\n", 2, "must be 32 bytes"),
        (f"[Interface]\nPrivateKey={PRIV}\nListenPort = 65536\n", 3, "ListenPort must be"),
        (f"[Interface]\nPrivateKey={PRIV}\nListenPort = -1\n", 3, "ListenPort must be"),
        (f"[Interface]\nPrivateKey={PRIV}\nMTU = 100\n", 3, "MTU must be"),
        (f"[Interface]\nPrivateKey={PRIV}\nMTU = 1200\nAddress = fd00::1/64\n", 1, "MTU 1200"),
        (f"[Interface]\nPrivateKey={PRIV}\nAddress = 10.0.0.300/24\n", 3, "not an IP address"),
        (f"[Interface]\nPrivateKey={PRIV}\nAddress = 10.0.0.1/33\n", 3, "not an IP address"),
        (f"[Interface]\nPrivateKey={PRIV}\nAddress = 10.0.0.1/ 3x\n", 3, "prefix length"),
        (f"[Interface]\nPrivateKey={PRIV}\nAddress = 10.0.0.1/24,,\n", 3, "empty item"),
        (f"[Interface]\nPrivateKey={PRIV}\nAddress = 224.0.0.1/24\n", 3, "not a unicast"),
        (f"[Interface]\nPrivateKey={PRIV}\nListenPort=1\nListenPort=2\n", 4, "given twice"),
        (f"[Interface]\nPrivateKey={PRIV}\n[Interface]\n", 3, "second [Interface]"),
        ("[Interface]\nListenPort = 1\n", 1, "no PrivateKey"),
        (f"[Interface]\nPrivateKey={PRIV}\n\n[Peer]\nEndpoint=192.0.2.1:1\n", 4, "no PublicKey"),
        (
            f"[Interface]\nPrivateKey={PRIV}\n[Peer]\nPublicKey={PUB1}\n[Peer]\nPublicKey={PUB1}\n",
            5,
            "repeats the peer at line 3",
        ),
        (f"[Interface]\nPrivateKey={PRIV}\n[Peer]\nEndpoint = vpn.example:51820\n", 4, "names"),
        (f"[Interface]\nPrivateKey={PRIV}\n[Peer]\nEndpoint = 2001:db8::1:51820\n", 4, "IPv6"),
        (f"[Interface]\nPrivateKey={PRIV}\n[Peer]\nEndpoint = [192.0.2.1]:5\n", 4, "brackets"),
        (f"[Interface]\nPrivateKey={PRIV}\n[Peer]\nEndpoint = 192.0.2.1:0\n", 4, "port must"),
        (f"[Interface]\nPrivateKey={PRIV}\n[Peer]\nEndpoint = 192.0.2.1\n", 4, "IPv4:port"),
        (f"[Interface]\nPrivateKey={PRIV}\n[Peer]\nEndpoint = [2001:db8::1]\n", 4, "[IPv6]:port"),
        (f"[Interface]\nPrivateKey={PRIV}\n[Peer]\nEndpoint = 0.0.0.0:1\n", 4, "not a unicast"),
        (
            f"[Interface]\nPrivateKey={PRIV}\n[Peer]\nEndpoint=[::ffff:1.2.3.4]:1\n",
            4,
            "IPv4-mapped",
        ),
        (f"[Interface]\nPrivateKey={PRIV}\n[Peer]\nAllowedIPs = 10.0.0.0/40\n", 4, "not an IP"),
        (f"[Interface]\nPrivateKey={PRIV}\n[Peer]\nPersistentKeepalive = x\n", 4, "Persistent"),
        (f"[Interface]\nPrivateKey={PRIV}\n[Peer]\nPersistentKeepalive=70000\n", 4, "Persistent"),
        (f"[Interface]\nPrivateKey={PRIV}\n[Peer]\nPresharedKey = {'A' * 43}=\n", 4, "all zero"),
        ("", 0, "no [Interface] section"),
    ],
)
def test_errors_name_the_line(body: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_wgquick(body, source="wg0.conf")
    text = str(info.value)
    prefix = f"wg0.conf:{line}: " if line else "wg0.conf: "
    assert text.startswith(prefix), text
    assert message in text
    assert "\n" not in text
    assert PRIV not in text


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_wgquick(tmp_path / "missing.conf")
    binary = tmp_path / "bin.conf"
    binary.write_bytes(b"[Interface]\n\xff\xfe\n")
    with pytest.raises(ConfigError, match=r"bin.conf:2: not UTF-8"):
        load_wgquick(binary)
    big = tmp_path / "big.conf"
    big.write_bytes(b"#" * (2 << 20))
    with pytest.raises(ConfigError, match="larger than"):
        load_wgquick(big)
    good = tmp_path / "wg0.conf"
    good.write_text(FULL)
    assert load_wgquick(good) == parse_wgquick(FULL, source=str(good))


def test_cli_up_rejects_bad_file_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "wg9.conf"
    bad.write_text(FULL.replace("MTU = 1380", "MTU = 1380\nTable = off"))
    assert main(["up", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err == f"punchtrio: error: {bad}:8: Table is not supported by punchtrio\n"
    assert main(["up"]) == 2
    assert "--config" in capsys.readouterr().err
    assert main(["up", "--config", str(bad), "--interface", "x" * 16]) == 2


def test_cli_up_names_the_peer_the_device_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clash = tmp_path / "wg5.conf"
    clash.write_text(
        f"[Interface]\nPrivateKey = {PRIV}\n\n[Peer]\nPublicKey = {PUB1}\nAllowedIPs = 10.0.0.0/24\n"
        f"\n[Peer]\nPublicKey = {PUB2}\nAllowedIPs = 10.0.0.0/24\n"
    )
    # refused before any socket or device exists, so this needs no root
    assert main(["up", "--config", str(clash)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"punchtrio: error: {clash}:8: ")
    assert err.count("\n") == 1


_line = st.text(alphabet=st.sampled_from("[]=#,:./ \tabcdefPrivateKeyAddressPeerInterface019+"))


@settings(max_examples=300)
@given(st.lists(_line, max_size=12))
def test_parser_raises_only_config_error(lines: list[str]) -> None:
    try:
        parse_wgquick("\n".join(lines))
    except ConfigError as exc:
        message = str(exc)
    else:
        message = ""
    assert "\n" not in message


@settings(max_examples=300)
@given(st.text(max_size=300))
def test_arbitrary_text_raises_only_config_error(text: str) -> None:
    try:
        parse_wgquick(f"[Interface]\nPrivateKey = {PRIV}\n[Peer]\n{text}")
    except ConfigError:
        pass


_keys = st.binary(min_size=32, max_size=32).filter(any)
_v4 = st.builds(ipaddress.IPv4Address, st.integers(1, 2**32 - 1))
_nets = st.one_of(
    st.builds(
        lambda a, p: ipaddress.ip_network(f"{a}/{p}", strict=False),
        st.ip_addresses(v=4),
        st.integers(0, 32),
    ),
    st.builds(
        lambda a, p: ipaddress.ip_network(f"{a}/{p}", strict=False),
        st.ip_addresses(v=6),
        st.integers(0, 128),
    ),
)


@settings(max_examples=150)
@given(
    private=_keys,
    peers=st.lists(
        st.tuples(
            _keys,
            st.none() | _keys,
            st.lists(_nets, max_size=4),
            st.none()
            | st.tuples(st.sampled_from(["192.0.2.1", "2001:db8::5"]), st.integers(1, 65535)),
            st.none() | st.integers(1, 65535),
        ),
        max_size=3,
        unique_by=lambda p: p[0],
    ),
    port=st.none() | st.integers(0, 65535),
    mtu=st.integers(1280, 65535),
)
def test_rendered_configs_parse_back(
    private: bytes,
    peers: list[tuple[bytes, bytes | None, list[object], tuple[str, int] | None, int | None]],
    port: int | None,
    mtu: int,
) -> None:
    b64 = lambda k: base64.b64encode(k).decode()  # noqa: E731
    lines = ["[Interface]", f"privatekey={b64(private)}", f"MTU = {mtu}"]
    if port is not None:
        lines.append(f"ListenPort = {port}")
    for public, psk, nets, endpoint, keepalive in peers:
        lines += ["", "[Peer]", f"PublicKey = {b64(public)}"]
        if psk is not None:
            lines.append(f"PresharedKey = {b64(psk)}")
        lines.append("AllowedIPs = " + ", ".join(str(n) for n in nets))
        if endpoint is not None:
            host = f"[{endpoint[0]}]" if ":" in endpoint[0] else endpoint[0]
            lines.append(f"Endpoint = {host}:{endpoint[1]}")
        if keepalive is not None:
            lines.append(f"PersistentKeepalive = {keepalive}")
    config = parse_wgquick("\n".join(lines))
    assert config.interface.private_key == private
    assert config.interface.listen_port == port
    assert config.interface.mtu == mtu
    assert [p.public_key for p in config.peers] == [p[0] for p in peers]
    for parsed, (_, psk, nets, endpoint, keepalive) in zip(config.peers, peers, strict=True):
        assert parsed.preshared_key == psk
        assert list(parsed.allowed_ips) == nets
        assert parsed.endpoint == endpoint
        assert parsed.persistent_keepalive == keepalive
