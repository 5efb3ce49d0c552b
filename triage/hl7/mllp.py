"""MLLP (HL7 v2 minimal lower layer protocol) over TCP or TLS: a threaded listener and a sender, on python-hl7.

MLLP frames each message as 0x0b <message> 0x1c 0x0d (HL7 v2.5.1 appendix C); the receiver answers every
message on the same connection with its ACK before the next one is sent. TLS (MLLP inside TLS) is an
`ssl.SSLContext` on either side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hl7.mllp import InvalidBlockError, open_hl7_connection, start_hl7_server

from triage.errors import TriageError
from triage.hl7.messages import APPLICATION_INTERNAL_ERROR, DATA_TYPE_ERROR, HL7Error, ack, nak

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 10 * 1024 * 1024
MAX_ACK_BYTES = 1024 * 1024
INTERNAL_ERROR_TEXT = "internal error while processing the message: it was not accepted; send it again later"


class MLLPError(TriageError):
    """Sending over MLLP failed in a way that may pass: connection refused or reset, no ACK within the timeout,
    the connection closed without an ACK, a reply that is not an MLLP block, a TLS handshake that failed. The
    message may not have arrived: send it again (with the same MSH-10, so that the receiver can recognise it)."""


def _decode(block: bytes) -> str:
    """HL7 text from one block: UTF-8 (ASCII is a subset), else ISO 8859-1, which decodes any byte."""
    try:
        return block.decode("utf-8")
    except UnicodeDecodeError:
        return block.decode("latin-1")


class MLLPServer:
    """An MLLP listener on its own thread and event loop; each message goes to `handle`, whose ACK is sent back.

    `handle` runs on a small thread pool (it may block: a database write), one message at a time per connection
    and several connections at once. It returns the ACK text; when it raises `HL7Error` the answer is that error's
    NAK (`nak`), and when it raises anything else an AE with "internal error" (HL7 table 0357 code 207): the
    sender keeps the message and retries, and the listener goes on serving.

    Args:
        host, port: Where to listen; port 0 takes a free one (read `port` after `start`).
        handle: Message text -> ACK text.
        ssl_context: A server-side TLS context (MLLP inside TLS); None for plain TCP.
        max_message_bytes: A longer message is answered AR and its connection closed.
        idle_timeout_s: A connection that completes no message within this long is closed.
        max_connections: Connections served at once; more are closed on arrival.
        workers: Threads running `handle`.
    """

    def __init__(
        self,
        host: str,
        port: int,
        handle: Callable[[str], str],
        ssl_context: ssl.SSLContext | None = None,
        *,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        idle_timeout_s: float = 60.0,
        max_connections: int = 64,
        workers: int = 4,
    ) -> None:
        self.host = host
        self.port = port
        self.handle = handle
        self.ssl_context = ssl_context
        self.max_message_bytes = max_message_bytes
        self.idle_timeout_s = idle_timeout_s
        self.max_connections = max_connections
        self.workers = workers
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self._listening = threading.Event()
        self._startup_error: BaseException | None = None

    def start(self) -> None:
        """Listen; returns once the socket accepts connections.

        Raises:
            MLLPError: the address cannot be bound (in use, not local, not permitted).
        """
        if self._thread is not None:
            raise RuntimeError("the MLLP server is already started")
        self._listening.clear()
        self._startup_error = None
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="hl7-handle")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=f"hl7-mllp-{self.port}", daemon=True)
        self._thread.start()
        self._listening.wait()
        if self._startup_error is not None:
            self._thread.join()
            self._executor.shutdown(wait=False)
            self._thread = self._loop = self._executor = None
            error = self._startup_error
            raise MLLPError(f"cannot listen for HL7 on {self.host}:{self.port}: {error}") from error
        log.info("HL7 MLLP listening on %s:%s%s", self.host, self.port, " (TLS)" if self.ssl_context else "")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop listening, close open connections (a message being handled is not answered) and end the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._close(), loop).result(timeout_s)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._thread = self._loop = self._executor = self._server = None

    def __enter__(self) -> MLLPServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(self._loop_error)
        try:
            tls: dict[str, Any] = {"ssl": self.ssl_context, "ssl_handshake_timeout": 30.0} if self.ssl_context else {}
            self._server = loop.run_until_complete(
                start_hl7_server(self._serve, self.host, self.port, limit=self.max_message_bytes, **tls)
            )
            self.port = int(self._server.sockets[0].getsockname()[1])
        except BaseException as exc:  # reported to start(), which raises it on the caller's thread
            self._startup_error = exc
            self._listening.set()
            loop.close()
            return
        self._listening.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    @staticmethod
    def _loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """A peer that fails the TLS handshake (an untrusted client, plain TCP on a TLS port, a port scan) is
        a line in the log, not an error with a traceback; anything else goes to asyncio's default handler."""
        error = context.get("exception")
        if isinstance(error, ssl.SSLError | ConnectionError | TimeoutError):
            log.warning("HL7 connection failed before its first message: %s %s", type(error).__name__, error)
            return
        loop.default_exception_handler(context)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: Any, writer: Any) -> None:
        """One connection: read a block, answer it, until the peer closes, idles or oversteps."""
        task = asyncio.current_task()
        peer = writer.get_extra_info("peername")
        if task is None or len(self._connections) >= self.max_connections:
            log.warning("HL7 connection from %s refused: %d connections open", peer, len(self._connections))
            writer.close()
            return
        self._connections.add(task)
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    block = await asyncio.wait_for(reader.readblock(), self.idle_timeout_s)
                except TimeoutError:
                    log.info("HL7 connection from %s idle for %s s: closed", peer, self.idle_timeout_s)
                    return
                except asyncio.IncompleteReadError:
                    return  # the peer closed the connection (between messages, or in the middle of one)
                except ssl.SSLError as exc:  # before ValueError, which some of them also are
                    log.info("HL7 connection from %s ended: %s", peer, type(exc).__name__)
                    return
                except InvalidBlockError:
                    # readblock consumed up to the end of the block: the next one can still be read.
                    error = "the MLLP block does not begin with the start byte 0x0b"
                    writer.writeblock(ack("", "AR", error, error_code=DATA_TYPE_ERROR).encode())
                    await writer.drain()
                    continue
                except ValueError:  # python-hl7's reader overran its limit: the message is too long
                    log.warning("HL7 message from %s over %d bytes: refused", peer, self.max_message_bytes)
                    error = f"message longer than {self.max_message_bytes} bytes: refused"
                    writer.writeblock(ack("", "AR", error, error_code=DATA_TYPE_ERROR).encode())
                    await writer.drain()
                    return
                text = _decode(block)
                reply = await loop.run_in_executor(self._executor, self._answer, text)
                writer.writeblock(reply.encode("utf-8"))
                await writer.drain()
        except (OSError, ssl.SSLError) as exc:
            log.info("HL7 connection from %s ended: %s", peer, type(exc).__name__)
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 5.0)

    def _answer(self, text: str) -> str:
        """The handler's ACK, or a NAK when it fails: every message is answered."""
        try:
            reply = self.handle(text)
            if not isinstance(reply, str) or not reply.startswith("MSH"):
                raise TypeError(f"the HL7 handler returned {type(reply).__name__}, not an ACK message")
            return reply
        except HL7Error as exc:
            log.info("HL7 message refused (%s %s): %s", exc.ack_code, exc.code, exc.text)
            return nak(text, exc)
        except Exception:
            # The traceback is the handler's; the message text (patient data) is not logged.
            log.exception("HL7 handler failed; answered AE")
            return ack(text, "AE", INTERNAL_ERROR_TEXT, error_code=APPLICATION_INTERNAL_ERROR)


async def send_async(
    host: str,
    port: int,
    message: str,
    timeout_s: float = 30.0,
    ssl_context: ssl.SSLContext | None = None,
    *,
    max_ack_bytes: int = MAX_ACK_BYTES,
) -> str:
    """Send one message over a new MLLP connection and return the reply (the ACK text), as `send`.

    Raises:
        MLLPError: as `send`.
    """
    where = f"{host}:{port}"
    writer = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await open_hl7_connection(host, port, limit=max_ack_bytes, ssl=ssl_context)
            writer.writeblock(message.encode("utf-8"))
            await writer.drain()
            block = await reader.readblock()
    except TimeoutError as exc:
        raise MLLPError(f"no HL7 ACK from {where} within {timeout_s} s") from exc
    except asyncio.IncompleteReadError as exc:
        raise MLLPError(f"{where} closed the connection without an HL7 ACK") from exc
    except InvalidBlockError as exc:
        raise MLLPError(f"the reply from {where} is not an MLLP block (no start byte 0x0b)") from exc
    except ssl.SSLError as exc:  # before ValueError: a certificate verification error is both
        raise MLLPError(f"TLS with {where} failed: {exc}") from exc
    except ValueError as exc:
        raise MLLPError(f"the reply from {where} is longer than {max_ack_bytes} bytes") from exc
    except OSError as exc:
        raise MLLPError(f"cannot send HL7 to {where}: {exc}") from exc
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 5.0)
    return _decode(block)


def send(
    host: str,
    port: int,
    message: str,
    timeout_s: float = 30.0,
    ssl_context: ssl.SSLContext | None = None,
    *,
    max_ack_bytes: int = MAX_ACK_BYTES,
) -> str:
    """Send one message over a new MLLP connection and return the reply (the ACK text) as received.

    Blocking: call it from a worker thread, not from inside a running event loop (use `send_async` there). The
    reply is not interpreted here: `ack_status` reads its code.

    Args:
        timeout_s: For everything: connecting, the TLS handshake, sending and the ACK.
        ssl_context: A client-side TLS context (its CA and hostname check decide whom to trust); None for TCP.
        max_ack_bytes: A longer reply is an error.

    Raises:
        MLLPError: the connection is refused or reset, TLS fails, no ACK comes within `timeout_s`, the peer closes
            without one, or the reply is not an MLLP block.
    """
    return asyncio.run(
        send_async(host, port, message, timeout_s=timeout_s, ssl_context=ssl_context, max_ack_bytes=max_ack_bytes)
    )
