"""The connector's ``backend`` argument: what is refused before anything starts, and why."""

from __future__ import annotations

import socket

import pytest

from punchtrio import PrivateKey
from punchtrio.connect import Connector, MemoryInterface, UapiDevice
from punchtrio.rendezvous import MemoryHub
from punchtrio.wireguard import Device


def _connector(**options: object) -> Connector:
    key = PrivateKey.generate()
    rendezvous = MemoryHub().peer("alice", key.public_key())
    return Connector("alice", key, rendezvous, "10.99.0.1/24", **options)  # type: ignore[arg-type]


def test_an_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="backend 'kernel' is not 'userspace' or 'wireguard-go'"):
        _connector(backend="kernel")


@pytest.mark.parametrize(
    "option", [{"interface": MemoryInterface()}, {"socket_factory": socket.socket}]
)
def test_wireguard_go_needs_a_real_tun_and_real_sockets(option: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="needs a real TUN device and sockets"):
        _connector(backend="wireguard-go", **option)


def test_each_backend_gets_its_own_device() -> None:
    userspace = _connector()
    assert userspace.backend == "userspace"
    assert isinstance(userspace.core.device, Device)  # punchtrio's own, behind the mux
    wireguard_go = _connector(backend="wireguard-go")
    assert wireguard_go.backend == "wireguard-go"
    assert isinstance(wireguard_go.core.device, UapiDevice)
    assert wireguard_go.core.device.public_key == wireguard_go.public_key.raw
