#!/usr/bin/env python3
"""HTTP/3 test client for tower-cancel (needs aioquic: pip install aioquic==1.7.2).

  python3 client.py --port P [--host 127.0.0.1] [--path /x] [--method GET|POST]
      [--body-bytes N] --mode MODE [--after-bytes N] [--after-ms T] [--code 0x10c]
      [--send stop,reset] [--linger-ms 300] [--requests K] [--timeout-s 10]

Sends K concurrent requests on one QUIC connection (ALPN h3, server_name
"localhost", certificate NOT verified; body = N bytes of "x"), then per MODE:
complete | cancel-after-headers | cancel-after-bytes (>= N body bytes) |
cancel-after-ms (T ms after sending). Cancel = STOP_SENDING and/or RESET_STREAM
(--send) with --code, transmitted at once; the connection then stays open for
--linger-ms and is closed with H3_NO_ERROR (0x100); exit code 0.

stdout: JSON lines with "t" (time.monotonic()), "event", "req" (index, null for
the connection): sent, headers, trailers, data, cancelled ("sent" vs "noop"),
end (once per request, how = fin | reset | none), goaway, closed (by the
server), error. A request that neither ends nor is cancelled within --timeout-s
gives an error line, a message on stderr and exit code 1.
"""
import argparse, asyncio, json, ssl, sys, time

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, StreamDataReceived, StreamReset

H3_NO_ERROR = 0x100
FRAME_GOAWAY = 0x7
MODES = ("complete", "cancel-after-headers", "cancel-after-bytes", "cancel-after-ms")


def emit(event, req=None, **fields):
    print(json.dumps({"t": time.monotonic(), "event": event, "req": req, **fields}), flush=True)


def varint(buf, pos):
    """Decode a QUIC varint at buf[pos]: (value, next_pos), or None if incomplete."""
    end = pos + (1 << (buf[pos] >> 6)) if pos < len(buf) else pos + 1
    if end > len(buf):
        return None
    return int.from_bytes(buf[pos:end], "big") & ((1 << (8 * (end - pos) - 2)) - 1), end


class Request:
    def __init__(self, idx):
        self.idx, self.stream_id, self.status, self.total = idx, None, None, 0
        self.cancelled_at, self.ended = None, False
        self.settled = asyncio.Event()  # set once the request ended or was cancelled


class Client(QuicConnectionProtocol):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.h3 = H3Connection(self._quic)
        self.args = None
        self.by_stream = {}
        self.uni = {}  # server unidirectional stream id -> (buffer, parse position)
        self.closing = False
        self.terminated = asyncio.Event()

    # incoming
    def quic_event_received(self, event):
        if isinstance(event, StreamDataReceived) and event.stream_id % 4 == 3:
            self._sniff_goaway(event.stream_id, event.data)
        for h3_event in self.h3.handle_event(event):
            r = self.by_stream.get(getattr(h3_event, "stream_id", None))
            if r is not None and getattr(h3_event, "push_id", None) is None:
                self._on_h3(r, h3_event)
        if isinstance(event, StreamReset) and event.stream_id in self.by_stream:
            self._end(self.by_stream[event.stream_id], "reset", event.error_code)
        elif isinstance(event, ConnectionTerminated):
            self._on_closed(event)

    def datagram_received(self, data, addr):
        super().datagram_received(data, addr)
        # aioquic raises ConnectionTerminated for the peer's CONNECTION_CLOSE only at
        # the end of its draining period (3 PTO); the pending event shows it at once.
        if self._quic._close_event is not None and not self.closing:
            self._on_closed(self._quic._close_event)

    def _on_closed(self, event):
        if self.terminated.is_set():
            return
        if not self.closing:
            emit("closed", code=event.error_code, reason=event.reason_phrase,
                 frame_type=event.frame_type)
        for r in self.by_stream.values():
            self._end(r, "none", None)
        self.terminated.set()

    def _on_h3(self, r, ev):
        final_headers = False
        if isinstance(ev, HeadersReceived):
            hdrs = {k.decode("latin-1"): v.decode("latin-1") for k, v in ev.headers}
            if (r.status or 0) >= 200:
                emit("trailers", r.idx, headers=hdrs, fin=ev.stream_ended)
            else:
                r.status = int(hdrs.get(":status", "0"))
                final_headers = r.status >= 200
                emit("headers", r.idx, status=r.status, headers=hdrs, fin=ev.stream_ended)
        elif isinstance(ev, DataReceived) and ev.data:
            r.total += len(ev.data)
            emit("data", r.idx, bytes=len(ev.data), total=r.total)
        if ev.stream_ended:
            self._end(r, "fin", None)  # any cancel after this is moot: _cancel skips it
        mode = self.args.mode
        if mode == "cancel-after-headers" and final_headers:
            self._cancel(r, "headers")
        elif mode == "cancel-after-bytes" and (r.status or 0) >= 200 \
                and r.total >= self.args.after_bytes:
            self._cancel(r, "bytes")

    def _sniff_goaway(self, sid, data):
        # aioquic 1.7.2's H3Connection accepts GOAWAY on the server's control stream
        # but drops it (there is no H3 event for it), so scan that stream here too.
        buf, pos = self.uni.get(sid, (bytearray(), 0))
        if pos < 0:
            return  # some other unidirectional stream (QPACK, push)
        buf += data
        if pos == 0 and (kind := varint(buf, 0)):
            pos = kind[1] if kind[0] == 0x00 else -1  # stream type 0x00 = control
        while pos > 0 and (ftype := varint(buf, pos)) and (flen := varint(buf, ftype[1])):
            end = flen[1] + flen[0]
            if end > len(buf):
                break
            if ftype[0] == FRAME_GOAWAY:
                emit("goaway", id=(varint(buf[:end], flen[1]) or [None])[0])
            pos = end
        self.uni[sid] = (bytearray() if pos < 0 else buf, pos)

    # outgoing
    def _send(self, r):
        a = self.args
        sid = self._quic.get_next_available_stream_id()
        r.stream_id = sid
        self.by_stream[sid] = r
        body = b"x" * a.body_bytes
        headers = [(b":method", a.method.encode()), (b":scheme", b"https"),
                   (b":authority", f"{a.host}:{a.port}".encode()),
                   (b":path", a.path.encode()), (b"user-agent", b"tower-cancel-h3-test")]
        if body or a.method == "POST":
            headers.append((b"content-length", str(len(body)).encode()))
        self.h3.send_headers(sid, headers, end_stream=not body)
        if body:
            self.h3.send_data(sid, body, end_stream=True)
        self.transmit()
        emit("sent", r.idx, stream=sid, method=a.method, path=a.path, body_bytes=len(body))
        if a.mode == "cancel-after-ms":
            self._loop.call_later(a.after_ms / 1000, self._cancel, r, "ms")

    def _cancel(self, r, why):
        if r.cancelled_at is not None or r.ended:
            return
        a, q, sid = self.args, self._quic, r.stream_id
        sent, noop, errors = [], [], {}
        for what, call in (("stop", q.stop_stream), ("reset", q.reset_stream)):
            if what not in a.send:
                continue
            try:
                call(sid, a.code)
            except (ValueError, RuntimeError) as e:  # e.g. the stream's state is gone
                errors[what] = str(e)
                continue
            # reset_stream() silently does nothing once our side finished (FIN acked)
            # or was discarded; the sender's flag tells whether a frame was queued.
            stream = q._streams.get(sid)
            queued = what == "stop" or (stream is not None and stream.sender.reset_pending)
            (sent if queued else noop).append(what)
        self.transmit()  # the frames leave now, not at the next timer
        r.cancelled_at = self._loop.time()
        r.settled.set()
        emit("cancelled", r.idx, stream=sid, trigger=why, code=a.code, sent=sent,
             noop=noop, errors=errors, total=r.total)

    def _end(self, r, how, code):
        if r.ended:
            return
        r.ended = True
        r.settled.set()
        emit("end", r.idx, stream=r.stream_id, how=how, code=code, total=r.total,
             status=r.status, cancelled=r.cancelled_at is not None)

    async def exercise(self, args, deadline):
        self.args = args
        reqs = [Request(i) for i in range(args.requests)]
        for r in reqs:
            self._send(r)
        ok = True
        try:
            await asyncio.wait_for(asyncio.gather(*(r.settled.wait() for r in reqs)),
                                   max(0.0, deadline - self._loop.time()))
        except asyncio.TimeoutError:
            fail(f"timeout: not every request ended or was cancelled in {args.timeout_s}s")
            ok = False
        cancels = [r.cancelled_at for r in reqs if r.cancelled_at is not None]
        if ok and cancels:  # linger after the last cancel to see what the server does
            try:
                linger = max(cancels) + args.linger_ms / 1000 - self._loop.time()
                await asyncio.wait_for(self.terminated.wait(), max(0.0, linger))
            except asyncio.TimeoutError:
                pass
        for r in reqs:
            self._end(r, "none", None)
        self.closing = True
        self.close(error_code=H3_NO_ERROR)
        return ok


def fail(message):
    emit("error", error=message)
    print(f"client.py: {message}", file=sys.stderr, flush=True)


async def session(args):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.timeout_s
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN,
                               verify_mode=ssl.CERT_NONE, server_name="localhost")
    async with connect(args.host, args.port, configuration=config,
                       create_protocol=Client, wait_connected=False) as client:
        client.transmit()  # wait_connected=False leaves the first flight unsent
        try:
            await asyncio.wait_for(client.wait_connected(), deadline - loop.time())
        except (asyncio.TimeoutError, ConnectionError):
            fail(f"QUIC handshake with {args.host}:{args.port} failed or timed out")
            client.closing = True
            waiter = client._connected_waiter  # fails with ConnectionError on close:
            if waiter is not None:  # retrieve that so asyncio does not warn about it
                waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
            return False
        return await client.exercise(args, deadline)


def parse_args():
    p = argparse.ArgumentParser(description="HTTP/3 cancellation test client (aioquic)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/")
    p.add_argument("--method", default="GET", choices=["GET", "POST"])
    p.add_argument("--mode", required=True, choices=MODES)
    for name, default in (("--body-bytes", 0), ("--after-bytes", 1), ("--after-ms", 100),
                          ("--linger-ms", 300), ("--requests", 1)):
        p.add_argument(name, type=int, default=default)
    p.add_argument("--code", type=lambda s: int(s, 0), default=0x10C)
    p.add_argument("--send", default="stop,reset")
    p.add_argument("--timeout-s", type=float, default=10.0)
    args = p.parse_args()
    args.send = [s.strip() for s in args.send.split(",") if s.strip()]
    if not args.send or set(args.send) - {"stop", "reset"}:
        p.error("--send takes stop, reset or stop,reset")
    if args.requests < 1 or args.body_bytes < 0:
        p.error("--requests must be >= 1 and --body-bytes >= 0")
    return args


def main():
    args = parse_args()
    try:  # hard stop in case closing itself hangs
        ok = asyncio.run(asyncio.wait_for(session(args), args.timeout_s + args.linger_ms / 1000 + 5))
    except (asyncio.TimeoutError, OSError) as e:
        fail(f"{type(e).__name__}: {e}")
        ok = False
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
