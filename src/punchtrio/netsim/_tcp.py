"""A small TCP as a sans-IO core: handshake, cumulative acks, retransmission, flow control, FIN, RST.

:class:`TcpConnection` is one end of one connection. It never does I/O and never reads a clock: the
caller gives it segments and the time, takes the segments it wants sent, re-arms one timer, and
reads its events. The simulated stream socket (``_stream.py``) is the Trio shell around it.

What it models, and what it leaves out (see ``docs/netsim.md``):

- a three-way handshake, cumulative acknowledgement, an out-of-order queue at the receiver, and
  retransmission of the oldest unacknowledged segment on a timeout (RFC 6298 estimator, Karn's
  rule, exponential backoff), after three duplicate acks, and on each partial ack (NewReno);
- flow control by the receiver's advertised window (at most :data:`TCP_RECEIVE_BUFFER` bytes),
  with zero-window probes; no congestion control: the sender fills whatever window is offered;
- FIN in both directions (half-close), RST (refused connections, aborts), TIME-WAIT;
- sequence numbers are unbounded Python integers (no 32-bit wraparound), segments are objects
  (no header bytes, no options, no checksum), and there is no simultaneous open, urgent data,
  SACK, timestamps or window scaling.
"""

from __future__ import annotations

import enum
import errno
import os
from collections import deque
from dataclasses import dataclass

TCP_MSS = 1460
"""Largest payload of one simulated TCP segment, in bytes."""

TCP_SEND_BUFFER = 64 * 1024
"""Bytes a simulated TCP socket buffers for sending (unsent plus unacknowledged); ``send`` blocks
when it is full."""

TCP_RECEIVE_BUFFER = 64 * 1024
"""Bytes a simulated TCP socket buffers unread; it is also the largest window it advertises."""

INITIAL_RTO = 1.0
MIN_RTO = 0.2
MAX_RTO = 120.0
SYN_RETRIES = 6
SYNACK_RETRIES = 5
DATA_RETRIES = 15
TIME_WAIT_SECONDS = 60.0
DUPACK_THRESHOLD = 3


@dataclass(frozen=True, slots=True)
class TcpSegment:
    """One simulated TCP segment: the header fields netsim models and the payload.

    ``seq`` is the sequence number of the first octet (the SYN or FIN flag counts as one octet);
    ``ack`` is the acknowledgement number, or ``None`` when the ACK flag is clear; ``window`` is
    the receive window in bytes; ``data`` is the payload; ``syn``, ``fin`` and ``rst`` are the
    flags. Sequence numbers are unbounded integers (no wraparound).
    """

    seq: int
    ack: int | None = None
    window: int = 0
    data: bytes = b""
    syn: bool = False
    fin: bool = False
    rst: bool = False

    @property
    def length(self) -> int:
        """Octets of sequence space the segment occupies: payload plus one each for SYN and FIN."""
        return len(self.data) + self.syn + self.fin

    @property
    def flags(self) -> str:
        """The flags as tcpdump prints them: ``S``, ``F``, ``R``, ``P`` (payload) and ``.`` (ACK)."""
        text = (
            ("S" if self.syn else "")
            + ("F" if self.fin else "")
            + ("R" if self.rst else "")
            + ("P" if self.data else "")
            + ("." if self.ack is not None else "")
        )
        return text or "none"

    def sort_key(self) -> tuple[int, int, int, int]:
        """Return a key that orders segments canonically (for deterministic processing)."""
        flags = self.syn | self.fin << 1 | self.rst << 2
        return (self.seq, -1 if self.ack is None else self.ack, self.window, flags)


class TcpState(enum.Enum):
    """The RFC 9293 state of a :class:`TcpConnection` (LISTEN belongs to the listening socket)."""

    SYN_SENT = "SYN-SENT"
    SYN_RECEIVED = "SYN-RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN-WAIT-1"
    FIN_WAIT_2 = "FIN-WAIT-2"
    CLOSING = "CLOSING"
    TIME_WAIT = "TIME-WAIT"
    CLOSE_WAIT = "CLOSE-WAIT"
    LAST_ACK = "LAST-ACK"
    CLOSED = "CLOSED"


@dataclass(frozen=True)
class TcpEstablished:
    """The handshake completed: the connection can carry data."""


@dataclass(frozen=True)
class TcpTerminated:
    """The connection is over and sends nothing more; ``error`` says why if it failed.

    ``error`` is ``None`` after an orderly close (both FINs acknowledged, TIME-WAIT over), else
    :class:`ConnectionRefusedError`, :class:`ConnectionResetError` or :class:`TimeoutError`.
    """

    error: OSError | None


TcpEvent = TcpEstablished | TcpTerminated


def _error(kind: type[OSError], code: int) -> OSError:
    return kind(code, os.strerror(code))


class TcpConnection:
    """One end of a simulated TCP connection, sans-IO: segments and ``now`` (seconds) in and out.

    Make one with :meth:`active` (the connecting side, which sends a SYN) or :meth:`passive` (the
    listening side, given the peer's SYN). Drive it with :meth:`receive_segment`,
    :meth:`handle_timer` at :meth:`get_timer`, and send what :meth:`segments_to_send` returns; read
    :meth:`next_event` for :class:`TcpEstablished` and :class:`TcpTerminated`. The application side
    is :meth:`write`, :meth:`read`, :meth:`shutdown_write`, :meth:`close` and :meth:`abort`.
    ``isn`` is the initial sequence number; ``now`` is used only for timers. ``iss``, ``snd_una``,
    ``snd_nxt`` and ``rcv_nxt`` are RFC 9293's variables, readable for inspection.
    """

    def __init__(self, isn: int, now: float) -> None:
        self.iss = isn
        self.snd_una = isn
        self.snd_nxt = isn
        self.rcv_nxt = 0
        self._syn_received = False  # the peer's SYN is known (rcv_nxt is valid)
        self._phase = "syn-sent"
        self._send = bytearray()
        self._send_start = isn + 1  # sequence number of self._send[0]
        self._receive = bytearray()
        self._out_of_order: dict[int, tuple[bytes, bool]] = {}
        self._peer_window_right = isn + 1
        self._fin_queued = False
        self._fin_seq: int | None = None
        self._fin_acked = False
        self._peer_fin = False
        self._peer_fin_first = False
        self._orphan = False
        self.error: OSError | None = None
        """Why the connection failed (refused, reset, timed out), or None."""
        self._events: deque[TcpEvent] = deque()
        # Output requests.
        self._need_syn = False
        self._need_ack = False
        self._need_rst = False
        self._stray_rst: int | None = None  # the ack of a stray SYN-ACK, answered with an RST
        self._retransmit = False
        self._probe = False
        self._last_window = TCP_RECEIVE_BUFFER
        # Timers.
        self._rto = INITIAL_RTO
        self._srtt: float | None = None
        self._rttvar = 0.0
        self._rto_deadline: float | None = None
        self._persist_deadline: float | None = None
        self._persist_interval = INITIAL_RTO
        self._time_wait_deadline: float | None = None
        self._retries = 0
        self._timed: tuple[int, float] | None = None  # (sequence to be acked, time sent)
        # Loss recovery.
        self._dupacks = 0
        self._recover: int | None = None

    # --- construction --------------------------------------------------------------------------

    @classmethod
    def active(cls, isn: int, now: float) -> TcpConnection:
        """Return the connecting end: in SYN-SENT, with its SYN ready to send."""
        connection = cls(isn, now)
        connection._need_syn = True
        return connection

    @classmethod
    def passive(cls, isn: int, syn: TcpSegment, now: float) -> TcpConnection:
        """Return the listening end for the peer's ``syn``: in SYN-RECEIVED, its SYN-ACK ready."""
        connection = cls(isn, now)
        connection._phase = "syn-received"
        connection._syn_received = True
        connection.rcv_nxt = syn.seq + 1
        connection._set_peer_window(isn + 1, syn.window)
        connection._need_syn = True
        return connection

    # --- state -----------------------------------------------------------------------------------

    @property
    def state(self) -> TcpState:
        """The connection's RFC 9293 state."""
        if self._phase == "closed":
            return TcpState.CLOSED
        if self._time_wait_deadline is not None:
            return TcpState.TIME_WAIT
        if self._phase == "syn-sent":
            return TcpState.SYN_SENT
        if self._phase == "syn-received":
            return TcpState.SYN_RECEIVED
        if not self._fin_queued:
            return TcpState.CLOSE_WAIT if self._peer_fin else TcpState.ESTABLISHED
        if not self._peer_fin:
            return TcpState.FIN_WAIT_2 if self._fin_acked else TcpState.FIN_WAIT_1
        return TcpState.LAST_ACK if self._peer_fin_first else TcpState.CLOSING

    @property
    def established(self) -> bool:
        """True once the handshake completed (and until the connection is terminated)."""
        return self._phase == "open"

    @property
    def connecting(self) -> bool:
        """True during the handshake (SYN-SENT or SYN-RECEIVED)."""
        return self._phase in ("syn-sent", "syn-received")

    @property
    def terminated(self) -> bool:
        """True once the connection sends nothing more (closed, reset, timed out, or refused)."""
        return self._phase == "closed"

    @property
    def send_space(self) -> int:
        """Bytes :meth:`write` would accept now."""
        return TCP_SEND_BUFFER - len(self._send)

    @property
    def unread(self) -> int:
        """Bytes received in order and not yet read."""
        return len(self._receive)

    @property
    def peer_finished(self) -> bool:
        """True once the peer's FIN arrived in order: after the unread bytes, reads give EOF."""
        return self._peer_fin

    @property
    def write_shut(self) -> bool:
        """True once :meth:`shutdown_write` or :meth:`close` queued our FIN."""
        return self._fin_queued

    def next_event(self) -> TcpEvent | None:
        """Return the next :class:`TcpEstablished` or :class:`TcpTerminated`, or None."""
        return self._events.popleft() if self._events else None

    @property
    def wants_to_send(self) -> bool:
        """True if :meth:`segments_to_send` would return something now."""
        if self._phase == "closed":
            return self._need_rst
        if (
            self._stray_rst is not None
            or self._need_syn
            or self._need_ack
            or self._need_rst
            or self._retransmit
            or self._probe
        ):
            return True
        if self._phase != "open":
            return False
        if self._fin_queued and self._fin_seq is None and self.snd_nxt == self._data_end:
            return True
        return self.snd_nxt < self._data_end and self.snd_nxt < self._peer_window_right

    # --- the application side --------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Buffer as much of ``data`` as fits and return how many bytes were taken (maybe 0).

        Raises the connection's error if it failed, and :class:`BrokenPipeError` after
        :meth:`shutdown_write` or before the handshake completed.
        """
        if self.error is not None:
            raise _error(type(self.error), self.error.errno or errno.EPIPE)
        if self._fin_queued or self._phase != "open":
            raise _error(BrokenPipeError, errno.EPIPE)
        count = min(len(data), self.send_space)
        self._send += data[:count]
        return count

    def read(self, max_bytes: int) -> bytes:
        """Return up to ``max_bytes`` unread bytes (b"" if none; see :attr:`peer_finished`)."""
        data = bytes(self._receive[:max_bytes])
        del self._receive[:max_bytes]
        window = self._window()
        if self._phase == "open" and (
            self._last_window < TCP_RECEIVE_BUFFER // 2 and window >= self._last_window + TCP_MSS
        ):
            self._need_ack = True  # a window update, so a sender stalled on a full window resumes
        return data

    def shutdown_write(self) -> None:
        """Queue our FIN after the buffered data (half-close). Idempotent."""
        self._fin_queued = True

    def close(self) -> None:
        """Close as the application's ``close()`` does.

        Unread received data means an abort (RST), as in Linux; during the handshake the
        connection is dropped (a SYN-RECEIVED one with an RST); otherwise the buffered data and a
        FIN are still delivered, and data arriving afterwards is answered with an RST.
        """
        if self._phase == "closed":
            return
        if self._receive or self._phase == "syn-received":
            self.abort()
            return
        if self._phase == "syn-sent":
            self._terminate(None)
            return
        self._orphan = True
        self._fin_queued = True

    def abort(self) -> None:
        """Send an RST and terminate at once (no error is recorded: the application chose it)."""
        if self._phase == "closed":
            return
        self._need_rst = self._phase != "syn-sent"
        self._terminate(None)

    # --- segments in ------------------------------------------------------------------------------

    def receive_segment(self, segment: TcpSegment, now: float) -> None:
        """Process one segment addressed to this connection."""
        if self._phase == "closed":
            return
        if self._phase == "syn-sent":
            self._receive_in_syn_sent(segment, now)
            return
        if segment.rst:
            window = max(self._window(), 1)
            if self.rcv_nxt <= segment.seq < self.rcv_nxt + window:
                closing = self._time_wait_deadline is not None or self._phase == "syn-received"
                self._terminate(None if closing else _error(ConnectionResetError, errno.ECONNRESET))
            return
        if segment.syn:
            if self._phase == "syn-received":
                self._need_syn = True  # our SYN-ACK was lost: the peer sent its SYN again
            else:
                self._need_ack = True  # our ACK of its SYN-ACK was lost
            return
        if segment.ack is None:
            return
        if self._phase == "syn-received":
            if segment.ack != self.iss + 1:
                self._need_ack = True
                return
            self._phase = "open"
            self._events.append(TcpEstablished())
        self._process_ack(segment, now)
        if self._phase == "closed":
            return
        self._process_data(segment)
        self._check_done(now)

    def _receive_in_syn_sent(self, segment: TcpSegment, now: float) -> None:
        if segment.ack is not None and segment.ack != self.iss + 1:
            if not segment.rst:
                self._stray_rst = segment.ack  # not an answer to our SYN (RFC 9293 3.10.7.3)
            return
        if segment.rst:
            if segment.ack is not None:
                self._terminate(_error(ConnectionRefusedError, errno.ECONNREFUSED))
            return
        if not segment.syn or segment.ack is None:
            return  # a SYN without ACK would be a simultaneous open, which is not simulated
        self._syn_received = True
        self.rcv_nxt = segment.seq + 1
        self._phase = "open"
        self._need_syn = False
        self._ack_advanced(segment.ack, now)
        self._set_peer_window(segment.ack, segment.window)
        self._need_ack = True
        self._events.append(TcpEstablished())

    def _process_ack(self, segment: TcpSegment, now: float) -> None:
        ack = segment.ack
        assert ack is not None
        if ack > self.snd_nxt:
            self._need_ack = True  # acknowledges something never sent
            return
        if ack > self.snd_una:
            self._ack_advanced(ack, now)
            self._set_peer_window(ack, segment.window)
            return
        if ack < self.snd_una:
            return
        window_changed = ack + segment.window != self._peer_window_right
        self._set_peer_window(ack, segment.window)
        if (
            not segment.length
            and not window_changed
            and self.snd_nxt > self.snd_una
            and self._recover is None
        ):
            self._dupacks += 1
            if self._dupacks == DUPACK_THRESHOLD:
                self._recover = self.snd_nxt
                self._retransmit = True
                self._timed = None

    def _ack_advanced(self, ack: int, now: float) -> None:
        taken = max(0, min(ack, self._data_end) - self._send_start)
        if taken:
            del self._send[:taken]
            self._send_start += taken
        if self._fin_seq is not None and ack > self._fin_seq:
            self._fin_acked = True
        self.snd_una = ack
        self._dupacks = 0
        if self._timed is not None and ack >= self._timed[0]:
            self._sample_rtt(now - self._timed[1])
            self._timed = None
        self._retries = 0
        self._rto = self._computed_rto()  # new data acked: forget the backoff, as Linux does
        self._rto_deadline = now + self._rto if self.snd_una < self.snd_nxt else None
        if self._recover is not None:
            if ack < self._recover:
                self._retransmit = True  # a partial ack: the next hole is lost too (NewReno)
            else:
                self._recover = None

    def _sample_rtt(self, rtt: float) -> None:
        if self._srtt is None:
            self._srtt, self._rttvar = rtt, rtt / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - rtt)
            self._srtt = 0.875 * self._srtt + 0.125 * rtt
        self._rto = self._computed_rto()

    def _computed_rto(self) -> float:
        if self._srtt is None:
            return INITIAL_RTO
        return min(MAX_RTO, max(MIN_RTO, self._srtt + 4 * self._rttvar))

    def _set_peer_window(self, ack: int, window: int) -> None:
        self._peer_window_right = ack + window
        if window:
            self._persist_deadline = None
            self._persist_interval = self._rto

    def _process_data(self, segment: TcpSegment) -> None:
        if not segment.data and not segment.fin:
            if segment.seq == self.rcv_nxt - 1:
                self._need_ack = True  # a zero-window probe: answer with our window
            return
        end = segment.seq + len(segment.data)
        if end + segment.fin <= self.rcv_nxt:
            self._need_ack = True  # an old duplicate (a retransmitted FIN, too): ack it again
            return
        if self._orphan and segment.data:
            self.abort()  # data for a closed socket: Linux answers with an RST
            return
        right = self.rcv_nxt + self._window()
        if segment.seq > self.rcv_nxt:
            if segment.seq < right:
                data = segment.data[: right - segment.seq]
                fin = segment.fin and len(data) == len(segment.data)
                self._out_of_order[segment.seq] = (data, fin)
            self._need_ack = True  # a duplicate ack tells the sender about the hole
            return
        self._accept(segment.seq, segment.data, segment.fin)
        while self._out_of_order:
            start = min(self._out_of_order)
            if start > self.rcv_nxt:
                break
            data, fin = self._out_of_order.pop(start)
            if start + len(data) + fin > self.rcv_nxt:
                self._accept(start, data, fin)
        self._need_ack = True

    def _accept(self, seq: int, data: bytes, fin: bool) -> None:
        if self._peer_fin:
            return
        data = data[self.rcv_nxt - seq :]
        room = self._window()
        if len(data) > room:
            data, fin = data[:room], False
        self._receive += data
        self.rcv_nxt += len(data)
        if fin:
            self.rcv_nxt += 1
            self._peer_fin = True
            self._peer_fin_first = not self._fin_queued
            self._out_of_order.clear()

    def _check_done(self, now: float) -> None:
        if not (self._peer_fin and self._fin_acked) or self._time_wait_deadline is not None:
            return
        if self._peer_fin_first:
            self._terminate(None)  # LAST-ACK -> CLOSED
        else:
            self._time_wait_deadline = now + TIME_WAIT_SECONDS
            self._rto_deadline = self._persist_deadline = None

    def _terminate(self, error: OSError | None) -> None:
        self._phase = "closed"
        if error is not None:
            self.error = error
        self._rto_deadline = self._persist_deadline = self._time_wait_deadline = None
        self._need_syn = self._need_ack = self._retransmit = self._probe = False
        self._out_of_order.clear()
        self._events.append(TcpTerminated(error))

    # --- timers ----------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """Return when :meth:`handle_timer` should next run (seconds), or None."""
        deadlines = [
            d
            for d in (self._rto_deadline, self._persist_deadline, self._time_wait_deadline)
            if d is not None
        ]
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> None:
        """Run the expired timers: retransmission, zero-window probe, end of TIME-WAIT."""
        if self._time_wait_deadline is not None and now >= self._time_wait_deadline:
            self._terminate(None)
            return
        if self._rto_deadline is not None and now >= self._rto_deadline:
            self._retries += 1
            limit = {"syn-sent": SYN_RETRIES, "syn-received": SYNACK_RETRIES}.get(
                self._phase, DATA_RETRIES
            )
            if self._retries > limit:
                self._terminate(_error(TimeoutError, errno.ETIMEDOUT))
                return
            self._rto = min(MAX_RTO, self._rto * 2)
            self._rto_deadline = now + self._rto
            self._timed = None
            self._dupacks = 0
            if self._phase == "open":
                self._retransmit = True
                self._recover = self.snd_nxt
            else:
                self._need_syn = True
        if self._persist_deadline is not None and now >= self._persist_deadline:
            self._probe = True
            self._persist_interval = min(MAX_RTO, self._persist_interval * 2)
            self._persist_deadline = now + self._persist_interval

    # --- segments out -----------------------------------------------------------------------------

    @property
    def _data_end(self) -> int:
        return self._send_start + len(self._send)

    def _window(self) -> int:
        return max(0, TCP_RECEIVE_BUFFER - len(self._receive))

    def _segment(self, seq: int, data: bytes = b"", *, fin: bool = False) -> TcpSegment:
        window = self._window()
        self._last_window = window
        return TcpSegment(seq, self.rcv_nxt, window, data, fin=fin)

    def segments_to_send(self, now: float) -> list[TcpSegment]:
        """Return the segments to send now, in order, and arm the timers they need."""
        out: list[TcpSegment] = []
        if self._stray_rst is not None:
            out.append(TcpSegment(self._stray_rst, rst=True))
            self._stray_rst = None
        if self._need_rst:
            self._need_rst = False
            out.append(TcpSegment(self.snd_nxt, self.rcv_nxt, 0, rst=True))
        if self._phase == "closed":
            return out
        if self._need_syn:
            self._need_syn = False
            ack = self.rcv_nxt if self._syn_received else None
            out.append(TcpSegment(self.iss, ack, self._window(), syn=True))
            self.snd_nxt = self.iss + 1
            if self._rto_deadline is None:
                self._rto_deadline = now + self._rto
            if self._retries == 0 and self._timed is None:
                self._timed = (self.iss + 1, now)
        if self._phase != "open":
            return out
        if self._retransmit:
            self._retransmit = False
            self._timed = None
            if self.snd_una < self.snd_nxt:
                out.append(self._oldest())
                if self._rto_deadline is None:
                    self._rto_deadline = now + self._rto
        self._send_new(out, now)
        if self._probe:
            self._probe = False
            if self.snd_una == self.snd_nxt and self.snd_nxt < self._data_end:
                out.append(self._segment(self.snd_nxt - 1))
        if self._need_ack and not out:
            out.append(self._segment(self.snd_nxt))
        self._need_ack = False
        return out

    def _oldest(self) -> TcpSegment:
        if self._fin_seq is not None and self.snd_una == self._fin_seq:
            return self._segment(self._fin_seq, fin=True)
        offset = self.snd_una - self._send_start
        end = min(self.snd_nxt, self._data_end, self.snd_una + TCP_MSS)
        return self._segment(self.snd_una, bytes(self._send[offset : offset + end - self.snd_una]))

    def _send_new(self, out: list[TcpSegment], now: float) -> None:
        end = self._data_end
        while self.snd_nxt < end and self.snd_nxt < self._peer_window_right:
            size = min(TCP_MSS, end - self.snd_nxt, self._peer_window_right - self.snd_nxt)
            offset = self.snd_nxt - self._send_start
            out.append(self._segment(self.snd_nxt, bytes(self._send[offset : offset + size])))
            self.snd_nxt += size
            if self._timed is None and self._recover is None:
                self._timed = (self.snd_nxt, now)
            if self._rto_deadline is None:
                self._rto_deadline = now + self._rto
        if self._fin_queued and self._fin_seq is None and self.snd_nxt == end:
            self._fin_seq = self.snd_nxt
            out.append(self._segment(self.snd_nxt, fin=True))
            self.snd_nxt += 1
            if self._rto_deadline is None:
                self._rto_deadline = now + self._rto
        if (
            self.snd_nxt < end
            and self.snd_una == self.snd_nxt
            and self._persist_deadline is None
            and self._peer_window_right <= self.snd_nxt
        ):
            self._persist_deadline = now + self._persist_interval
