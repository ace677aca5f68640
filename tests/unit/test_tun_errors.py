"""The TUN device's one-line errors name the real cause (no root needed: pytun is stubbed)."""

from __future__ import annotations

import errno

import pytest
import pytun

from punchtrio.tunnel import TunDevice, TunnelError


@pytest.mark.parametrize("code", [errno.EPERM, errno.EACCES])
def test_permission_errors_say_root_or_cap_net_admin(
    monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    def refuse(**_: object) -> None:
        raise pytun.Error(code, "Operation not permitted")

    monkeypatch.setattr(pytun, "TunTapDevice", refuse)
    with pytest.raises(
        TunnelError, match=r"cannot create TUN device pt0: .*needs root or CAP_NET_ADMIN"
    ):
        TunDevice("pt0")


def test_other_errors_carry_no_permission_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    def busy(**_: object) -> None:
        raise pytun.Error(errno.EBUSY, "Device or resource busy")

    monkeypatch.setattr(pytun, "TunTapDevice", busy)
    with pytest.raises(TunnelError) as raised:
        TunDevice("pt0")
    assert "busy" in str(raised.value)
    assert "CAP_NET_ADMIN" not in str(raised.value)


def test_a_name_too_long_for_the_kernel_is_refused_before_any_syscall() -> None:
    with pytest.raises(TunnelError, match="longer than 15 bytes"):
        TunDevice("x" * 16)
