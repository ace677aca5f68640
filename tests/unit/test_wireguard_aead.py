"""The transport AEAD: PyNaCl's private libsodium module when it passes its check, else the bindings."""

from __future__ import annotations

import struct
import sys
from types import SimpleNamespace
from typing import Any

import nacl
import pytest

from punchtrio.wireguard import _aead

KEY = bytes(range(32))
PREFIX = b"\x04\0\0\0\x10\x20\x30\x40"
COUNTER = struct.pack("<Q", 5)


def test_the_direct_libsodium_path_is_chosen_on_this_pynacl() -> None:
    # Fails when a PyNaCl release moves or changes ``nacl._sodium``: the device would still work
    # (on the bindings), but slower, and this is how anyone would notice.
    assert _aead.BACKEND == "libsodium (direct)", f"PyNaCl {nacl.__version__}"
    assert _aead.seal is not _aead._seal_bindings
    assert _aead.open_ is not _aead._open_bindings


def _run(seal: Any, open_: Any) -> None:
    for size in (0, 1, 16, 1420):
        plaintext = bytes(range(256)) * 6
        plaintext = plaintext[:size]
        message = seal(PREFIX, COUNTER, plaintext, KEY)
        assert message == _aead._seal_bindings(PREFIX, COUNTER, plaintext, KEY)
        opened = open_(message, KEY)
        assert opened is not None
        assert bytes(opened) == plaintext
        assert open_(message[:-1] + bytes([message[-1] ^ 1]), KEY) is None


def test_both_paths_seal_and_open_the_same_messages() -> None:
    direct = _aead._load_sodium()
    assert direct is not None
    _run(*direct)  # the private fast path
    _run(_aead._seal_bindings, _aead._open_bindings)  # the public fallback


def test_no_nacl_sodium_module_means_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nacl._sodium", None)  # the import raises ImportError
    assert _aead._load_sodium() is None


def test_a_module_without_the_functions_means_the_fallback() -> None:
    assert _aead._load_sodium(SimpleNamespace(ffi=None, lib=SimpleNamespace())) is None


def test_functions_that_fail_the_known_answer_test_mean_the_fallback() -> None:
    from nacl._sodium import ffi, lib

    def wrong_encrypt(out: Any, *args: Any) -> int:
        # A libsodium whose signature changed under the same name: writes nothing, says OK.
        return 0

    broken = SimpleNamespace(
        crypto_aead_chacha20poly1305_ietf_encrypt=wrong_encrypt,
        crypto_aead_chacha20poly1305_ietf_decrypt=lib.crypto_aead_chacha20poly1305_ietf_decrypt,
    )
    assert _aead._load_sodium(SimpleNamespace(ffi=ffi, lib=broken)) is None

    def accepting_decrypt(*args: Any) -> int:
        return 0  # never says "forged": the tamper check must catch it

    lenient = SimpleNamespace(
        crypto_aead_chacha20poly1305_ietf_encrypt=lib.crypto_aead_chacha20poly1305_ietf_encrypt,
        crypto_aead_chacha20poly1305_ietf_decrypt=accepting_decrypt,
    )
    assert _aead._load_sodium(SimpleNamespace(ffi=ffi, lib=lenient)) is None
    # and the real module passes
    assert _aead._load_sodium(SimpleNamespace(ffi=ffi, lib=lib)) is not None


def test_cookie_replies_are_sealed_on_the_direct_path_and_match_the_bindings() -> None:
    assert _aead.COOKIE_BACKEND == "libsodium (direct)", f"PyNaCl {nacl.__version__}"
    assert _aead.seal_cookie is not _aead._seal_cookie_bindings
    nonce = bytes(range(24))
    for cookie, mac1 in ((bytes(16), bytes(16)), (b"\xaa" * 16, bytes(range(16)))):
        sealed = _aead.seal_cookie(cookie, mac1, nonce, KEY)
        assert len(sealed) == 32
        assert sealed == _aead._seal_cookie_bindings(cookie, mac1, nonce, KEY)
    assert _aead.seal_cookie(bytes(16), bytes(16), nonce, KEY) != _aead.seal_cookie(
        bytes(16), b"\x01" + bytes(15), nonce, KEY
    )


def test_a_cookie_sealer_that_fails_its_known_answer_test_means_the_fallback() -> None:
    from nacl._sodium import ffi, lib

    def wrong_encrypt(*args: Any) -> int:
        return 0  # writes nothing, says OK

    assert _aead._load_sodium_cookie(SimpleNamespace(ffi=None, lib=SimpleNamespace())) is None
    broken = SimpleNamespace(crypto_aead_xchacha20poly1305_ietf_encrypt=wrong_encrypt)
    assert _aead._load_sodium_cookie(SimpleNamespace(ffi=ffi, lib=broken)) is None
    assert _aead._load_sodium_cookie(SimpleNamespace(ffi=ffi, lib=lib)) is not None
