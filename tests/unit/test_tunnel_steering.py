"""Kernel steering to wireguard-go's port: the nft script (pure) and the shell's errors and calls.

Real packets through the rules are in ``tests/interop/test_steering.py``; here a stand-in ``nft``
on PATH records what the shell runs, so these tests need neither root nor nftables (except the
one marked ``root``, which asks the real ``nft --check`` whether it accepts the script).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from punchtrio.tunnel import TunnelError, steer_wireguard, steering_ruleset, steering_table_name
from tests.conftest import require_root_and

EXPECTED = """\
table inet punchtrio_steer_wg0 {}
delete table inet punchtrio_steer_wg0
table inet punchtrio_steer_wg0 {
\tchain prerouting {
\t\ttype filter hook prerouting priority raw; policy accept;
\t\tudp dport 51820 fib daddr type local \
@th,64,32 { 0x01000000, 0x02000000, 0x03000000, 0x04000000 } notrack udp dport set 51821
\t}
\tchain output {
\t\ttype filter hook output priority raw; policy accept;
\t\toifname != "lo" udp sport 51821 notrack udp sport set 51820
\t}
}
"""

VALID_TABLE = re.compile(r"punchtrio_[A-Za-z0-9_]{0,245}")
PORTS = st.integers(min_value=1, max_value=65535)
INTERFACES = st.text(min_size=1, max_size=15)


def test_the_script_for_one_case_is_exactly_this() -> None:
    table = steering_table_name("wg0")
    assert table == "punchtrio_steer_wg0"
    assert steering_ruleset(table=table, shared_port=51820, wireguard_port=51821) == EXPECTED


@pytest.mark.parametrize(
    ("interface", "table"),
    [
        ("wg0", "punchtrio_steer_wg0"),
        ("wg-0", "punchtrio_steer_wg_2d0"),
        ("wg_0", "punchtrio_steer_wg__0"),
        ("wg.hub", "punchtrio_steer_wg_2ehub"),
        ("é", "punchtrio_steer__c3_a9"),
    ],
)
def test_table_names_keep_letters_and_digits_and_escape_the_rest(
    interface: str, table: str
) -> None:
    assert steering_table_name(interface) == table


@given(interface=INTERFACES)
def test_a_table_name_is_always_valid_and_deterministic(interface: str) -> None:
    table = steering_table_name(interface)
    assert VALID_TABLE.fullmatch(table), table
    assert steering_table_name(interface) == table
    steering_ruleset(table=table, shared_port=1, wireguard_port=2)  # accepted


@given(first=INTERFACES, second=INTERFACES)
def test_distinct_interfaces_never_share_a_table(first: str, second: str) -> None:
    if first != second:
        assert steering_table_name(first) != steering_table_name(second)


@given(interface=INTERFACES, shared=PORTS, wireguard=PORTS)
def test_the_script_names_both_ports_in_both_rules(
    interface: str, shared: int, wireguard: int
) -> None:
    table = steering_table_name(interface)
    if shared == wireguard:
        with pytest.raises(ValueError, match="must differ"):
            steering_ruleset(table=table, shared_port=shared, wireguard_port=wireguard)
        return
    script = steering_ruleset(table=table, shared_port=shared, wireguard_port=wireguard)
    assert script.startswith(f"table inet {table} {{}}\ndelete table inet {table}\n")
    assert f"udp dport {shared} fib daddr type local @th,64,32 " in script
    assert f"notrack udp dport set {wireguard}\n" in script
    assert f'oifname != "lo" udp sport {wireguard} notrack udp sport set {shared}\n' in script


@pytest.mark.parametrize("port", [0, -1, 65536, 100_000, True])
@pytest.mark.parametrize("which", ["shared_port", "wireguard_port"])
def test_ports_outside_the_udp_range_are_refused(which: str, port: int) -> None:
    ports = {"shared_port": 5000, "wireguard_port": 5001, which: port}
    with pytest.raises(ValueError, match=f"{which} must be a UDP port number 1-65535"):
        steering_ruleset(table="punchtrio_steer_wg0", **ports)


def test_equal_ports_are_refused() -> None:
    with pytest.raises(ValueError, match="shared_port and wireguard_port must differ, both are 7"):
        steering_ruleset(table="punchtrio_steer_wg0", shared_port=7, wireguard_port=7)


@pytest.mark.parametrize(
    "table",
    [
        "",
        "filter",  # someone else's table: the script would replace it
        "counter",  # an nft keyword
        "punchtrio-steer",
        "punchtrio_steer wg0",
        "punchtrio_steer_wg0\n",
        "punchtrio_steer_wg0;flush ruleset",
        "punchtrio_" + "x" * 246,  # 256 characters: one over nftables' limit
    ],
)
def test_bad_table_names_are_refused(table: str) -> None:
    with pytest.raises(ValueError, match="invalid steering table name"):
        steering_ruleset(table=table, shared_port=1, wireguard_port=2)


def test_the_longest_table_name_is_accepted() -> None:
    steering_ruleset(table="punchtrio_" + "x" * 245, shared_port=1, wireguard_port=2)


@pytest.mark.parametrize("interface", ["", "x" * 240, "é" * 40])
def test_an_empty_or_overlong_interface_name_is_refused(interface: str) -> None:
    with pytest.raises(ValueError, match="interface"):
        steering_table_name(interface)


def _fake_nft(directory: Path, *, stderr: str = "", status: int = 0) -> Path:
    """Put an ``nft`` on ``directory`` that appends argv and stdin to a log, then exits."""
    log = directory / "nft.log"
    script = directory / "nft"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "argv: $*" >> {log}\n'
        f"/bin/cat >> {log}\n"
        f"printf '%s' '{stderr}' >&2\n"
        f"exit {status}\n"
    )
    script.chmod(0o755)
    return log


def test_entering_loads_the_script_and_leaving_deletes_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = _fake_nft(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    with steer_wireguard(shared_port=51820, wireguard_port=51821, table="punchtrio_steer_wg0"):
        assert log.read_text() == "argv: -f -\n" + EXPECTED
    assert log.read_text() == (
        "argv: -f -\n"
        + EXPECTED
        + "argv: -f -\n"
        + "table inet punchtrio_steer_wg0 {}\ndelete table inet punchtrio_steer_wg0\n"
    )


def test_an_exception_inside_the_block_still_deletes_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = _fake_nft(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    with (
        pytest.raises(KeyError),
        steer_wireguard(shared_port=51820, wireguard_port=51821, table="punchtrio_steer_wg0"),
    ):
        raise KeyError("boom")
    assert log.read_text().endswith("delete table inet punchtrio_steer_wg0\n")
    assert log.read_text().count("argv: -f -") == 2


def test_bad_arguments_run_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = _fake_nft(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    with (
        pytest.raises(ValueError, match="must differ"),
        steer_wireguard(shared_port=9, wireguard_port=9, table="punchtrio_steer_wg0"),
    ):
        pass  # pragma: no cover - never entered
    assert not log.exists()


def test_a_missing_nft_is_one_line_naming_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory
    with (
        pytest.raises(TunnelError) as caught,
        steer_wireguard(shared_port=51820, wireguard_port=51821, table="punchtrio_steer_wg0"),
    ):
        pass  # pragma: no cover - never entered
    message = str(caught.value)
    assert message.startswith("nft not found: install nftables (Debian: apt-get install nftables)")
    assert "\n" not in message


def test_nft_refusing_without_root_is_one_line_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What nft 1.0.6 prints when run without CAP_NET_ADMIN (checked with setpriv as nobody).
    _fake_nft(
        tmp_path,
        stderr="netlink: Error: cache initialization failed: Operation not permitted\n",
        status=1,
    )
    monkeypatch.setenv("PATH", str(tmp_path))
    with (
        pytest.raises(TunnelError) as caught,
        steer_wireguard(shared_port=51820, wireguard_port=51821, table="punchtrio_steer_wg0"),
    ):
        pass  # pragma: no cover - never entered
    assert str(caught.value) == (
        "nft could not create table inet punchtrio_steer_wg0: netlink: Error: cache "
        "initialization failed: Operation not permitted (steering needs root or CAP_NET_ADMIN)"
    )


def test_a_refused_script_reports_the_first_line_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_nft(
        tmp_path,
        stderr="/dev/stdin:6:3-9: Error: syntax error\n  udp dport\n  ^^^^^^^\n",
        status=1,
    )
    monkeypatch.setenv("PATH", str(tmp_path))
    with (
        pytest.raises(TunnelError) as caught,
        steer_wireguard(shared_port=51820, wireguard_port=51821, table="punchtrio_steer_wg0"),
    ):
        pass  # pragma: no cover - never entered
    assert str(caught.value) == (
        "nft could not create table inet punchtrio_steer_wg0: /dev/stdin:6:3-9: Error: syntax error"
    )


@pytest.mark.root
@settings(max_examples=25)  # one nft process per example
@given(interface=INTERFACES, shared=PORTS, wireguard=PORTS)
def test_nft_accepts_the_script(interface: str, shared: int, wireguard: int) -> None:
    require_root_and("nft")
    if shared == wireguard:
        return
    script = steering_ruleset(
        table=steering_table_name(interface), shared_port=shared, wireguard_port=wireguard
    )
    # --check: parsed and validated by the kernel, applied to nothing.
    checked = subprocess.run(
        ["nft", "--check", "-f", "-"], input=script, capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stderr
