"""Published test vectors for WireGuard's primitives, and the handshake against an independent Noise."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_decrypt,
    crypto_aead_chacha20poly1305_ietf_encrypt,
    crypto_scalarmult,
    crypto_scalarmult_base,
)
from noise.connection import Keypair, NoiseConnection  # type: ignore[import-untyped]

from punchtrio.wireguard import Device, PeerConfig, _aead, _noise, _tai64n
from punchtrio.wireguard._noise import HandshakeError
from tests.packets import ipv4

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent / "vectors" / "wireguard.json").read_text()
)
PROLOGUE = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
NAME = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"


@pytest.mark.parametrize("case", VECTORS["x25519_rfc7748_5_2"])
def test_x25519_rfc7748_scalar_multiplication(case: dict[str, str]) -> None:
    out = _noise.dh(bytes.fromhex(case["scalar"]), bytes.fromhex(case["u"]))
    assert out.hex() == case["out"]


def test_x25519_rfc7748_iterated() -> None:
    k = u = bytes.fromhex("09" + "00" * 31)
    results = {}
    for i in range(1, 1001):
        k, u = crypto_scalarmult(k, u), k
        results[i] = k.hex()
    for count, expected in VECTORS["x25519_rfc7748_5_2_iterated"].items():
        assert results[int(count)] == expected


def test_x25519_rfc7748_diffie_hellman() -> None:
    v = VECTORS["x25519_rfc7748_6_1"]
    a, b = bytes.fromhex(v["alice_private"]), bytes.fromhex(v["bob_private"])
    assert _noise.public_key(a).hex() == v["alice_public"]
    assert _noise.public_key(b).hex() == v["bob_public"]
    assert _noise.dh(a, bytes.fromhex(v["bob_public"])).hex() == v["shared"]
    assert _noise.dh(b, bytes.fromhex(v["alice_public"])).hex() == v["shared"]


@pytest.mark.parametrize("point", VECTORS["x25519_low_order_points"])
def test_low_order_points_are_rejected(point: str) -> None:
    with pytest.raises(HandshakeError) as info:
        _noise.dh(bytes(range(1, 33)), bytes.fromhex(point))
    assert info.value.reason == "low_order"


def test_chacha20poly1305_rfc8439_2_8_2() -> None:
    v = VECTORS["chacha20poly1305_rfc8439_2_8_2"]
    key, nonce, aad = (bytes.fromhex(v[k]) for k in ("key", "nonce", "aad"))
    plaintext = v["plaintext_ascii"].encode("ascii")
    sealed = crypto_aead_chacha20poly1305_ietf_encrypt(plaintext, aad, nonce, key)
    assert sealed.hex() == v["ciphertext"] + v["tag"]
    assert crypto_aead_chacha20poly1305_ietf_decrypt(sealed, aad, nonce, key) == plaintext


def test_wireguard_nonce_is_zero_prefix_and_little_endian_counter() -> None:
    key = bytes(range(32))
    counter = 0x0102030405060708
    sealed = _noise.aead_encrypt(key, counter, b"x", b"")
    nonce = b"\0\0\0\0" + struct.pack("<Q", counter)
    assert crypto_aead_chacha20poly1305_ietf_decrypt(sealed, b"", nonce, key) == b"x"


@pytest.mark.parametrize("case", VECTORS["kdf_wireguard_go"])
def test_kdf_reference_vectors(case: dict[str, str]) -> None:
    key, data = bytes.fromhex(case["key"]), bytes.fromhex(case["input"])
    t0, t1, t2 = _noise.kdf3(key, data)
    assert (t0.hex(), t1.hex(), t2.hex()) == (case["t0"], case["t1"], case["t2"])
    assert _noise.kdf2(key, data) == (t0, t1)
    assert _noise.kdf1(key, data) == t0


@pytest.mark.parametrize("case", VECTORS["tai64n"])
def test_tai64n_encoding(case: dict[str, Any]) -> None:
    encoded = _tai64n.encode(case["unix"], whiten=case["whiten"])
    assert encoded.hex() == case["encoded"]
    assert abs(_tai64n.decode(encoded) - case["unix"]) < 0.02


def test_tai64n_orders_like_time() -> None:
    times = [0.0, 0.5, 1.0, 1e9, 1e9 + 0.017, 1.7e9, 4e9]
    encoded = [_tai64n.encode(t) for t in times]
    assert encoded == sorted(encoded)
    assert len(set(encoded)) == len(encoded)


def test_initial_chaining_key_and_hash() -> None:
    # Computed independently of _noise with hashlib, straight from the paper's definitions.
    ck = hashlib.blake2s(NAME).digest()
    assert ck == _noise.INITIAL_CHAINING_KEY
    assert hashlib.blake2s(ck + PROLOGUE).digest() == _noise.INITIAL_HASH


# --- The whole handshake against the `noiseprotocol` package, used only as an oracle. -----------


def _oracle(initiator: bool, private: bytes, remote_public: bytes | None, psk: bytes) -> Any:
    conn = NoiseConnection.from_name(NAME)
    if initiator:
        conn.set_as_initiator()
    else:
        conn.set_as_responder()
    conn.set_prologue(PROLOGUE)
    conn.set_psks(psk=psk)
    conn.set_keypair_from_private_bytes(Keypair.STATIC, private)
    if remote_public is not None:
        conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, remote_public)
    conn.start_handshake()
    return conn


def _mac1(receiver_public: bytes, body: bytes) -> bytes:
    key = hashlib.blake2s(b"mac1----" + receiver_public).digest()
    return hashlib.blake2s(body, digest_size=16, key=key).digest()


@pytest.mark.parametrize("psk", [None, bytes(range(100, 132))])
def test_our_initiator_against_noise_oracle_responder(psk: bytes | None) -> None:
    ours_private, oracle_private = bytes(range(1, 33)), bytes(range(33, 65))
    oracle_public = crypto_scalarmult_base(oracle_private)
    device = Device(ours_private, wall_clock=lambda: 1.7e9)
    device.add_peer(
        PeerConfig(
            oracle_public,
            preshared_key=psk,
            allowed_ips=(ipaddress.ip_network("10.9.0.2/32"),),
            endpoint=("192.0.2.2", 51820),
        )
    )
    packet = ipv4("10.9.0.1", "10.9.0.2", b"through the oracle")
    assert device.send_packet(packet, now=1.0) is None
    [(initiation, addr)] = device.datagrams_to_send()
    assert addr == ("192.0.2.2", 51820)
    assert len(initiation) == 148
    assert initiation[116:132] == _mac1(oracle_public, initiation[:116])
    assert initiation[132:] == bytes(16)

    oracle = _oracle(False, oracle_private, None, psk or bytes(32))
    timestamp = oracle.read_message(initiation[8:116])
    assert bytes(timestamp) == _tai64n.encode(1.7e9)
    assert oracle.noise_protocol.handshake_state.rs.public_bytes == device.public_key
    body = oracle.write_message(b"")
    assert len(body) == 48
    sender = 0x11223344
    response = struct.pack("<II", 2, sender) + initiation[4:8] + bytes(body)
    response += _mac1(device.public_key, response) + bytes(16)
    assert device.receive_datagram(response, ("192.0.2.2", 51820), now=1.1) is None

    [(transport, _)] = device.datagrams_to_send()  # the queued packet, encrypted
    kind, receiver, counter = struct.unpack_from("<IIQ", transport)
    assert (kind, receiver, counter) == (4, sender, 0)
    plaintext = oracle.decrypt(transport[16:])
    assert plaintext[: len(packet)] == packet
    assert len(plaintext) % 16 == 0

    reply = ipv4("10.9.0.2", "10.9.0.1", b"and back")
    (our_index,) = struct.unpack_from("<I", initiation, 4)
    wire = struct.pack("<IIQ", 4, our_index, 0) + oracle.encrypt(reply)
    assert device.receive_datagram(wire, ("192.0.2.2", 51820), now=1.2) == reply


@pytest.mark.parametrize("psk", [None, bytes(range(7, 39))])
def test_noise_oracle_initiator_against_our_responder(psk: bytes | None) -> None:
    ours_private, oracle_private = bytes(range(2, 34)), bytes(range(40, 72))
    oracle_public = crypto_scalarmult_base(oracle_private)
    device = Device(ours_private)
    device.add_peer(
        PeerConfig(
            oracle_public, preshared_key=psk, allowed_ips=(ipaddress.ip_network("10.9.0.2/32"),)
        )
    )
    oracle = _oracle(True, oracle_private, device.public_key, psk or bytes(32))
    body = oracle.write_message(_tai64n.encode(1.7e9))
    sender = 0xAABBCCDD
    initiation = struct.pack("<II", 1, sender) + bytes(body)
    initiation += _mac1(device.public_key, initiation) + bytes(16)
    assert device.receive_datagram(initiation, ("198.51.100.7", 4000), now=5.0) is None

    [(response, addr)] = device.datagrams_to_send()
    assert addr == ("198.51.100.7", 4000)
    assert len(response) == 92
    kind, our_index, receiver = struct.unpack_from("<III", response)
    assert (kind, receiver) == (2, sender)
    assert response[60:76] == _mac1(oracle_public, response[:60])
    assert oracle.read_message(response[12:60]) == b""
    assert oracle.handshake_finished

    packet = ipv4("10.9.0.2", "10.9.0.1", b"first data confirms the session")
    wire = struct.pack("<IIQ", 4, our_index, 0) + oracle.encrypt(packet)
    assert device.receive_datagram(wire, ("198.51.100.7", 4000), now=5.1) == packet

    back = ipv4("10.9.0.1", "10.9.0.2", b"hi")
    sent = device.send_packet(back, now=5.2)
    assert sent is not None
    assert struct.unpack_from("<IIQ", sent[0]) == (4, sender, 0)
    assert oracle.decrypt(sent[0][16:])[: len(back)] == back


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 1420, 1500])
def test_transport_aead_backends_agree(size: int) -> None:
    key, prefix, counter = bytes(range(32)), b"\x04\0\0\0\x10\x20\x30\x40", struct.pack("<Q", 77)
    plaintext = bytes(range(256)) * 6
    plaintext = plaintext[:size]
    ours = _aead.seal(prefix, counter, plaintext, key)
    reference = _aead._seal_bindings(prefix, counter, plaintext, key)
    assert ours == reference
    assert ours[:16] == prefix + counter
    assert ours[16:] == crypto_aead_chacha20poly1305_ietf_encrypt(
        plaintext, None, b"\0\0\0\0" + counter, key
    )
    for opener in (_aead.open_, _aead._open_bindings):
        opened = opener(ours, key)
        assert opened is not None
        assert bytes(opened) == plaintext
        assert opener(ours[:-1] + bytes([ours[-1] ^ 0x80]), key) is None
        assert opener(ours, bytes(32)) is None


def test_device_works_on_the_bindings_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    from punchtrio.wireguard import _device

    monkeypatch.setattr(_device, "_seal_message", _aead._seal_bindings)
    monkeypatch.setattr(_device, "_open", _aead._open_bindings)
    test_our_initiator_against_noise_oracle_responder(None)
    test_noise_oracle_initiator_against_our_responder(None)


def test_tai64n_after_is_the_next_whitened_step() -> None:
    ts = _tai64n.encode(1.7e9 + 0.5)
    nxt = _tai64n.after(ts)
    assert nxt > ts
    assert _tai64n.decode(nxt) - _tai64n.decode(ts) < 0.017
    assert (
        _tai64n.after(bytes.fromhex("400000006553f10a3b000000")).hex() == "400000006553f10b00000000"
    )


def test_reprs_never_show_key_material() -> None:
    import ipaddress

    from punchtrio.wireguard import PeerConfig
    from punchtrio.wireguard._noise import ConsumedInitiation, InitiatorState, TransportKeys

    secret = bytes(range(32))
    shown = [
        repr(
            PeerConfig(
                bytes(range(1, 33)),
                preshared_key=secret,
                allowed_ips=(ipaddress.ip_network("10.0.0.0/24"),),
            )
        ),
        repr(InitiatorState(1, secret, secret, secret)),
        repr(ConsumedInitiation(bytes(32), bytes(12), 1, bytes(32), secret, secret)),
        repr(TransportKeys(secret, secret)),
    ]
    for text in shown:
        assert repr(secret) not in text
        assert secret.hex() not in text
