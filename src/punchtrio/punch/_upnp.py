"""UPnP IGD port mapping, sans-IO: SSDP search, the device description, SOAP actions.

The last resort after PCP and NAT-PMP (:mod:`punchtrio.punch._portmap`): an Internet Gateway
Device found by an SSDP ``M-SEARCH`` (multicast UDP), whose description (HTTP) names the control
URL of its ``WANIPConnection`` (or ``WANPPPConnection``) service, where SOAP actions
(``AddPortMapping``, ``GetExternalIPAddress``, ``DeletePortMapping``) are posted.

Everything here builds or parses bytes; :mod:`punchtrio.punch._upnp_session` does the I/O. The
parsers raise only :class:`UpnpError`. What the LAN says is checked: the description must come
from the address that answered the search, the control URL must point at the same host and port,
documents are at most 64 KiB and may not declare a DTD or entities.
"""

from __future__ import annotations

import ipaddress
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit
from xml.sax.saxutils import escape

from .._exceptions import PunchtrioError

SSDP_ADDRESS = ("239.255.255.250", 1900)
"""Where SSDP searches go (UPnP Device Architecture 1.1 § 1.3)."""
IGD_DEVICE = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
SERVICE_TYPES = (
    "urn:schemas-upnp-org:service:WANIPConnection:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
)
"""The services that map ports, in order of preference."""
MAX_DOCUMENT = 65536
"""Bytes a description or SOAP response may have."""
CONFLICT_IN_MAPPING_ENTRY = 718
"""The UPnP error code for an external port that is mapped to someone else."""

_DEVICE_NS = "{urn:schemas-upnp-org:device-1-0}"
_SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
_SOAP_ENC = "http://schemas.xmlsoap.org/soap/encoding/"
_CONTROL_NS = "{urn:schemas-upnp-org:control-1-0}"


class UpnpError(PunchtrioError):
    """A UPnP message is malformed or untrustworthy, or the gateway refused an action
    (``code`` is then the UPnP error code, else ``None``)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


def msearch(search_target: str = IGD_DEVICE, *, mx: int = 2) -> bytes:
    """Return an SSDP ``M-SEARCH`` request for ``search_target``, answers within ``mx`` s."""
    return (
        "M-SEARCH * HTTP/1.1\r\n"
        f"HOST: {SSDP_ADDRESS[0]}:{SSDP_ADDRESS[1]}\r\n"
        'MAN: "ssdp:discover"\r\n'
        f"MX: {mx}\r\n"
        f"ST: {search_target}\r\n\r\n"
    ).encode()


def parse_ssdp_response(data: bytes, source_ip: str) -> str:
    """Return the ``LOCATION`` URL of an SSDP answer from ``source_ip``.

    The URL must be ``http://`` at the literal address ``source_ip`` (a device describes itself,
    never another host). Raises :class:`UpnpError` otherwise, or for anything that is not a
    ``200`` answer with a location.
    """
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise UpnpError("an SSDP answer is ASCII") from None
    lines = text.split("\r\n")
    if not lines[0].startswith("HTTP/1.1 200"):
        raise UpnpError(f"not an SSDP answer: {lines[0][:40]!r}")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    location = headers.get("location")
    if not location:
        raise UpnpError("an SSDP answer without LOCATION")
    _check_url(location, source_ip)
    return location


def _check_url(url: str, host: str, port: int | None = None) -> None:
    try:
        parts = urlsplit(url)
        url_port = parts.port or 80
        address = ipaddress.ip_address(parts.hostname or "")
    except ValueError:
        raise UpnpError(f"not an http URL at a literal address: {url[:80]!r}") from None
    if parts.scheme != "http" or str(address) != host or (port is not None and url_port != port):
        raise UpnpError(f"URL {url[:80]!r} does not point at the gateway {host}")


@dataclass(frozen=True)
class IgdService:
    """A gateway's port-mapping service: its ``service_type`` and ``control_url``."""

    service_type: str
    control_url: str


def _parse_xml(document: bytes) -> ET.Element:
    if len(document) > MAX_DOCUMENT:
        raise UpnpError(f"a UPnP document is at most {MAX_DOCUMENT} bytes")
    if b"<!DOCTYPE" in document or b"<!ENTITY" in document:
        raise UpnpError("a UPnP document may not declare a DTD or entities")
    try:
        return ET.fromstring(document)
    except (ET.ParseError, ValueError, LookupError) as exc:  # LookupError: unknown encoding
        raise UpnpError(f"malformed XML: {exc}") from None


def parse_description(document: bytes, location: str) -> IgdService:
    """Return the preferred port-mapping service of a device description fetched from
    ``location`` (its control URL resolved against ``URLBase`` or ``location``, and checked to
    point at the same host and port). Raises :class:`UpnpError` if there is none."""
    root = _parse_xml(document)
    base = root.findtext(f"{_DEVICE_NS}URLBase") or location
    found: dict[str, str] = {}
    for service in root.iter(f"{_DEVICE_NS}service"):
        kind = (service.findtext(f"{_DEVICE_NS}serviceType") or "").strip()
        control = (service.findtext(f"{_DEVICE_NS}controlURL") or "").strip()
        if kind in SERVICE_TYPES and control and kind not in found:
            found[kind] = control
    for kind in SERVICE_TYPES:
        if kind in found:
            try:
                url = urljoin(base, found[kind])
                parts = urlsplit(location)
            except ValueError:
                raise UpnpError(f"a malformed URL in the description: {base[:80]!r}") from None
            _check_url(url, parts.hostname or "", parts.port or 80)
            return IgdService(kind, url)
    raise UpnpError("the device offers no WANIPConnection or WANPPPConnection service")


def soap_request(
    service: IgdService, action: str, arguments: Sequence[tuple[str, str]] = ()
) -> tuple[dict[str, str], bytes]:
    """Return the headers and body of a SOAP ``action`` with ``arguments`` (in order)."""
    args = "".join(f"<{name}>{escape(value)}</{name}>" for name, value in arguments)
    body = (
        '<?xml version="1.0"?>'
        f'<s:Envelope xmlns:s="{_SOAP_ENV}" s:encodingStyle="{_SOAP_ENC}"><s:Body>'
        f'<u:{action} xmlns:u="{escape(service.service_type)}">{args}</u:{action}>'
        "</s:Body></s:Envelope>"
    ).encode()
    headers = {
        "Content-Type": 'text/xml; charset="utf-8"',
        "SOAPAction": f'"{service.service_type}#{action}"',
    }
    return headers, body


def parse_soap_response(document: bytes, action: str) -> dict[str, str]:
    """Return the output arguments of a SOAP ``action`` response.

    Raises :class:`UpnpError` with the UPnP error code for a fault, or for a malformed answer.
    """
    root = _parse_xml(document)
    body = root.find(f"{{{_SOAP_ENV}}}Body")
    if body is None or len(body) != 1:
        raise UpnpError("a SOAP answer has one element in its Body")
    answer = body[0]
    if answer.tag == f"{{{_SOAP_ENV}}}Fault":
        error = answer.find(f".//{_CONTROL_NS}UPnPError")
        code_text = error.findtext(f"{_CONTROL_NS}errorCode") if error is not None else None
        text = error.findtext(f"{_CONTROL_NS}errorDescription") if error is not None else None
        digits = (code_text or "").strip()
        code = int(digits) if digits.isascii() and digits.isdigit() else None
        raise UpnpError(f"the gateway refused {action}: {text or 'a SOAP fault'}", code)
    if not answer.tag.endswith(f"}}{action}Response"):
        raise UpnpError(f"not an answer to {action}: {answer.tag[:80]!r}")
    return {child.tag.rsplit("}", 1)[-1]: (child.text or "").strip() for child in answer}


def add_port_mapping(
    service: IgdService, *, external_port: int, internal_client: str, internal_port: int,
    lease: int, description: str = "punchtrio",
) -> tuple[dict[str, str], bytes]:  # fmt: skip
    """The SOAP request that maps UDP ``external_port`` to ``internal_client:internal_port`` for
    ``lease`` seconds (0: the gateway's choice; IGD 2 gateways cap it at a week)."""
    return soap_request(
        service,
        "AddPortMapping",
        [
            ("NewRemoteHost", ""),
            ("NewExternalPort", str(external_port)),
            ("NewProtocol", "UDP"),
            ("NewInternalPort", str(internal_port)),
            ("NewInternalClient", internal_client),
            ("NewEnabled", "1"),
            ("NewPortMappingDescription", description),
            ("NewLeaseDuration", str(lease)),
        ],
    )


def delete_port_mapping(service: IgdService, external_port: int) -> tuple[dict[str, str], bytes]:
    """The SOAP request that deletes our UDP mapping of ``external_port``."""
    return soap_request(
        service,
        "DeletePortMapping",
        [("NewRemoteHost", ""), ("NewExternalPort", str(external_port)), ("NewProtocol", "UDP")],
    )
