"""UPnP IGD, sans-IO: the SSDP answer, the device description and SOAP, with hypothesis on every
parser and the trust checks (a device describes only itself). The real miniupnpd runs in
``tests/lab/test_hard_nat_lab.py``."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from punchtrio.punch import IgdService, UpnpError
from punchtrio.punch._upnp import (
    MAX_DOCUMENT,
    add_port_mapping,
    delete_port_mapping,
    msearch,
    parse_description,
    parse_soap_response,
    parse_ssdp_response,
    soap_request,
)

GATEWAY = "192.168.1.1"
LOCATION = f"http://{GATEWAY}:5000/rootDesc.xml"
SSDP = (
    "HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nST: "
    "urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\nUSN: uuid:1::x\r\nEXT:\r\n"
    f"SERVER: Debian/12 UPnP/1.1 MiniUPnPd/2.3.1\r\nLOCATION: {LOCATION}\r\n\r\n"
).encode()


def description(control: str = "/ctl/IPConn", *, base: str | None = None, kind: int = 1) -> bytes:
    url_base = f"<URLBase>{base}</URLBase>" if base else ""
    return f"""<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0">{url_base}
<device><deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:1</deviceType>
<deviceList><device><deviceType>urn:schemas-upnp-org:device:WANDevice:1</deviceType>
<deviceList><device><deviceType>urn:schemas-upnp-org:device:WANConnectionDevice:1</deviceType>
<serviceList>
<service><serviceType>urn:schemas-upnp-org:service:WANCommonInterfaceConfig:1</serviceType>
<controlURL>/ctl/CmnIfCfg</controlURL></service>
<service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:{kind}</serviceType>
<controlURL>{control}</controlURL></service>
</serviceList></device></deviceList></device></deviceList></device></root>""".encode()


def soap_answer(inner: str) -> bytes:
    return (
        '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"'
        f' s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>{inner}'
        "</s:Body></s:Envelope>"
    ).encode()


SERVICE = IgdService("urn:schemas-upnp-org:service:WANIPConnection:1", f"http://{GATEWAY}:5000/c")


def test_the_search_asks_for_an_internet_gateway_device() -> None:
    text = msearch(mx=2).decode()
    assert text.startswith("M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\n")
    assert 'MAN: "ssdp:discover"\r\n' in text
    assert "ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n" in text
    assert text.endswith("\r\n\r\n")


def test_an_ssdp_answer_gives_its_location_only_at_the_answering_address() -> None:
    assert parse_ssdp_response(SSDP, GATEWAY) == LOCATION
    with pytest.raises(UpnpError, match="does not point at the gateway"):
        parse_ssdp_response(SSDP, "192.168.1.66")  # another host answered with this location
    elsewhere = SSDP.replace(GATEWAY.encode(), b"203.0.113.9")
    with pytest.raises(UpnpError, match="does not point at the gateway"):
        parse_ssdp_response(elsewhere, GATEWAY)
    named = SSDP.replace(GATEWAY.encode(), b"router.lan")
    with pytest.raises(UpnpError, match="literal address"):
        parse_ssdp_response(named, GATEWAY)
    with pytest.raises(UpnpError, match="without LOCATION"):
        parse_ssdp_response(b"HTTP/1.1 200 OK\r\nST: x\r\n\r\n", GATEWAY)


def test_the_description_names_the_ip_connection_control_url() -> None:
    service = parse_description(description(), LOCATION)
    assert service == IgdService(
        "urn:schemas-upnp-org:service:WANIPConnection:1", f"http://{GATEWAY}:5000/ctl/IPConn"
    )
    v2 = parse_description(description(kind=2), LOCATION)
    assert v2.service_type.endswith("WANIPConnection:2")
    based = parse_description(description("ctl", base=f"http://{GATEWAY}:5000/x/"), LOCATION)
    assert based.control_url == f"http://{GATEWAY}:5000/x/ctl"


def test_a_control_url_elsewhere_or_no_service_is_refused() -> None:
    with pytest.raises(UpnpError, match="does not point at the gateway"):
        parse_description(description("http://203.0.113.9:80/steal"), LOCATION)
    with pytest.raises(UpnpError, match="does not point at the gateway"):
        parse_description(description(f"http://{GATEWAY}:6000/other-port"), LOCATION)
    with pytest.raises(UpnpError, match="no WANIPConnection"):
        parse_description(description().replace(b"WANIPConnection", b"Nothing"), LOCATION)


def test_dtds_entities_and_huge_documents_are_refused() -> None:
    bomb = b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaa">]><r>&a;</r>'
    with pytest.raises(UpnpError, match="DTD"):
        parse_description(bomb, LOCATION)
    with pytest.raises(UpnpError, match="at most"):
        parse_soap_response(b" " * (MAX_DOCUMENT + 1), "X")


def test_soap_requests_and_answers() -> None:
    headers, body = add_port_mapping(
        SERVICE, external_port=51820, internal_client="192.168.1.20", internal_port=51820, lease=60
    )
    assert (
        headers["SOAPAction"] == '"urn:schemas-upnp-org:service:WANIPConnection:1#AddPortMapping"'
    )
    text = body.decode()
    for part in (
        "<NewExternalPort>51820</NewExternalPort>",
        "<NewProtocol>UDP</NewProtocol>",
        "<NewInternalClient>192.168.1.20</NewInternalClient>",
        "<NewLeaseDuration>60</NewLeaseDuration>",
    ):
        assert part in text
    _, delete = delete_port_mapping(SERVICE, 51820)
    assert b"<u:DeletePortMapping" in delete
    assert b"<NewExternalPort>51820</NewExternalPort>" in delete
    _, escaped = soap_request(SERVICE, "X", [("A", "<&>")])
    assert b"<A>&lt;&amp;&gt;</A>" in escaped
    answer = soap_answer(
        '<u:GetExternalIPAddressResponse xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:1">'
        "<NewExternalIPAddress>203.0.113.11</NewExternalIPAddress>"
        "</u:GetExternalIPAddressResponse>"
    )
    assert parse_soap_response(answer, "GetExternalIPAddress") == {
        "NewExternalIPAddress": "203.0.113.11"
    }
    with pytest.raises(UpnpError, match="not an answer to AddPortMapping"):
        parse_soap_response(answer, "AddPortMapping")


def test_a_soap_fault_carries_the_upnp_error_code() -> None:
    fault = soap_answer(
        "<s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>"
        '<UPnPError xmlns="urn:schemas-upnp-org:control-1-0"><errorCode>718</errorCode>'
        "<errorDescription>ConflictInMappingEntry</errorDescription></UPnPError></detail>"
        "</s:Fault>"
    )
    with pytest.raises(UpnpError, match="ConflictInMappingEntry") as caught:
        parse_soap_response(fault, "AddPortMapping")
    assert caught.value.code == 718


@given(st.binary(max_size=2000))
def test_the_parsers_raise_only_upnp_error(data: bytes) -> None:
    for parse in (
        lambda: parse_ssdp_response(data, GATEWAY),
        lambda: parse_description(data, LOCATION),
        lambda: parse_soap_response(data, "AddPortMapping"),
    ):
        try:
            parse()
        except UpnpError:
            pass


@given(st.integers(0, 2000), st.binary(min_size=1, max_size=8))
def test_mutated_documents_parse_or_raise_upnp_error(at: int, noise: bytes) -> None:
    for document, parse in (
        (description(), lambda d: parse_description(d, LOCATION)),
        (SSDP, lambda d: parse_ssdp_response(d, GATEWAY)),
    ):
        cut = at % len(document)
        try:
            parse(document[:cut] + noise + document[cut + len(noise) :])
        except UpnpError:
            pass
