"""Network sinks: webhook POSTs and MQTT publishes of the records, off the frame path, credentials never logged."""

from __future__ import annotations

import base64
import collections
import ipaddress
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable


from gradad.errors import GradError
from gradad.runtime.outage import OUTAGE_LOG_EVERY_S, Outage
from gradad.runtime.sinks.base import SinkBase, _passes_filter, record_to_json
from gradad.runtime.types import FrameResult
from gradad.urls import redact_url, redact_secrets_in, userinfo_end

log = logging.getLogger("gradad.runtime.sinks")

#: most of a webhook's reply that is read (the reply is not used; reading a little lets the connection close
#: cleanly, and a hostile endpoint's endless or huge body cannot fill the memory)
WEBHOOK_REPLY_BYTES = 64 * 1024
#: longest webhook POST timeout: a larger one (1e300 from a line file) overflows the socket timeout, and a station
#: that waits minutes for one record is better told that its endpoint is down
WEBHOOK_MAX_TIMEOUT_S = 300.0
#: most records a webhook keeps queued while its endpoint is down (each a few hundred bytes: 100 MB at most)
WEBHOOK_MAX_QUEUE = 200_000


def webhook_limit_problem(key: str, value: Any) -> str | None:
    """What is wrong with a number given as webhook ``timeout_s`` or ``queue_size`` (``must be ...``), or None: the
    one rule of :class:`WebhookSink` and of a line file's ``sinks.webhook`` section."""
    if key == "timeout_s" and not 0 < value <= WEBHOOK_MAX_TIMEOUT_S:
        return f"must be > 0 and at most {WEBHOOK_MAX_TIMEOUT_S:g} seconds"
    if key == "queue_size" and not 1 <= value <= WEBHOOK_MAX_QUEUE:
        return f"must be from 1 to {WEBHOOK_MAX_QUEUE}"
    return None


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A 3xx answer is a failed POST: urllib would resend it as a GET without the record (counted as sent) and
    carry the credentials to whatever host the redirect names."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        raise urllib.error.HTTPError(req.full_url, code, f"redirect to {redact_url(newurl)} refused (point the "
                                     f"webhook URL at the final address)", headers, fp)


def _check_authority(url: str, parsed: urllib.parse.SplitResult, label: str) -> None:
    """Refuse a URL whose user-info holds an unencoded ``/``, ``?`` or ``#`` (urllib would end the host there and
    send the records to a host made of the user name, or fail with the password's start quoted in the error) or
    whose path holds an ``@`` (the redaction would take the path for credentials), and one with a bad port. An
    ``@`` in the user-info is fine: the last ``@`` before the host ends the credentials, as urllib reads them."""
    at = userinfo_end(url.split("://", 1)[1])  # where the credentials end, read as redact_url reads them
    if at >= len(parsed.netloc):
        raise GradError(f"webhook URL {label!r}: cannot tell its host from its credentials; percent-encode '/', "
                        f"'?' and '#' in the user name and password and '@' in the path (e.g. '/' as %2F)")
    port = parsed.netloc.rpartition("@")[2].rpartition("]")[2].partition(":")[2]  # after the credentials
    try:
        number = parsed.port  # raises ValueError for a non-numeric port or one above 65535
    except ValueError:
        number = -1
    if number is not None and not 0 < number < 65536:
        problem = "is out of range (1-65535)" if port.isdigit() else "is not a number"
        raise GradError(f"webhook URL {label!r}: port {port!r} {problem}")
    if not parsed.hostname:
        raise GradError(f"webhook URL {label!r}: expected http(s)://host[:port]/path, the host is missing")


def cleartext_credentials(host: str, username: str | None) -> bool:
    """True when MQTT credentials would cross a network without TLS (a loopback broker is exempt)."""
    return username is not None and not _is_loopback(host)


def _split_credentials(parsed: urllib.parse.SplitResult) -> tuple[str, dict[str, str]]:
    """(URL without ``user:password@``, HTTP Basic ``Authorization`` header for them, if any)."""
    netloc = parsed.netloc.rpartition("@")[2]
    url = urllib.parse.urlunsplit(parsed._replace(netloc=netloc))
    if "@" not in parsed.netloc:
        return url, {}
    user, _, password = parsed.netloc.rpartition("@")[0].partition(":")
    token = base64.b64encode(f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode()).decode()
    return url, {"Authorization": f"Basic {token}"}


def _wait_while(busy: Callable[[], bool], timeout_s: float, wait: Callable[[float], Any]) -> None:
    """Call ``wait(seconds)`` (at most 0.1 s at a time) while ``busy()``, for at most ``timeout_s`` (a sink's
    shutdown drain)."""
    deadline = time.monotonic() + timeout_s
    while busy() and time.monotonic() < deadline:
        wait(min(0.1, max(0.0, deadline - time.monotonic())))


def _redacted_error(exc: BaseException, url: str | None = None, label: str = "") -> str:
    """An exception's text with every URL in it redacted (urllib errors may quote the URL); ``url`` (a webhook's,
    whose path may hold its token) is shown as ``label``."""
    text = " ".join(str(exc).split())
    return redact_secrets_in(text.replace(url, label) if url else text)


class _Outage(Outage):
    """A network sink's delivery outage (:class:`~gradad.runtime.outage.Outage`), logged as the sinks log, at most
    every :data:`OUTAGE_LOG_EVERY_S` (read when the sink starts). Records are numbered in the order they were
    queued: the outage ends when a record queued after its last failure is delivered."""

    def __init__(self, name: str) -> None:
        super().__init__(name, log, OUTAGE_LOG_EVERY_S)


class _RecordSink(SinkBase):
    """A sink that forwards JSON records, optionally only those of anomalous frames."""

    only_anomalous: bool = False

    def write(self, result: FrameResult) -> None:
        """Forward the frame's record (when it passes ``only_anomalous``)."""
        if self.only_anomalous and not result.is_anomalous:
            return
        self.write_record(result.to_record())

    def write_record(self, record: dict[str, Any]) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _report(self, kind: str, target: str, **counts: int) -> dict[str, dict[str, Any]]:
        """The summary block of :meth:`delivery_report`: the counts, the records lost (failed + dropped) and
        ``complete`` (none lost)."""
        lost = counts.get("failed", 0) + counts["dropped"]
        return {kind: {"target": target, **counts, "records_lost": lost, "complete": lost == 0}}

    def _log_totals(self, name: str, counts: str, lost: int) -> None:
        """The sink's last line: a warning when records were lost (the run's summary says so too)."""
        if lost:
            log.warning("%s: %s: %d records NOT delivered", name, counts, lost)
        else:
            log.info("%s: %s", name, counts)


class WebhookSink(_RecordSink):
    """POSTs each record as JSON (``Content-Type: application/json``) to ``url`` from a background thread.

    * The camera loop never waits on the network: records go to a bounded queue (``queue_size``); when it is
      full the **oldest** queued record is dropped (``dropped`` counts them).
    * Each POST has ``timeout_s``; a failed POST (network error, timeout, HTTP error) is retried once, then
      given up (``failed``); ``sent`` counts successes. Failures are logged once per outage (then at most every
      :data:`OUTAGE_LOG_EVERY_S`), and once when delivery works again; the counts go into the run summary.
    * ``only_anomalous`` (default) sends only NG records (records without a ``decision`` always go).
    * :meth:`close` waits up to ``close_timeout_s`` for the queue to drain, then stops the thread; records still
      queued then are counted as dropped.
    * Proxies from the environment (``https_proxy``...) are honoured, except for loopback hosts.
    """

    def __init__(self, url: str, timeout_s: float = 2.0, queue_size: int = 1000, only_anomalous: bool = True,
                 close_timeout_s: float = 10.0, retry_delay_s: float = 0.2) -> None:
        parsed = urllib.parse.urlsplit(url)
        # what logs and errors show: never the URL's credentials, query values or path (Slack, Teams and Discord
        # webhooks carry their token in the path)
        self.label = redact_url(url, hide_path=True)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise GradError(f"webhook URL must be http(s)://host[:port]/path, got {self.label!r}")
        _check_authority(url, parsed, self.label)
        if isinstance(queue_size, bool) or not isinstance(queue_size, int):
            raise GradError(f"webhook queue_size must be an integer, got {queue_size!r}")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
            raise GradError(f"webhook timeout_s must be a number of seconds, got {timeout_s!r}")
        for key, value in (("queue_size", queue_size), ("timeout_s", timeout_s)):
            problem = webhook_limit_problem(key, value)
            if problem:
                raise GradError(f"webhook {key} {problem}, got {value!r}")
        self.url, self._headers = _split_credentials(parsed)
        if self._headers and parsed.scheme == "http" and not _is_loopback(parsed.hostname or ""):
            log.warning("webhook %s: user name and password go to %s unencrypted (http); use https", self.label,
                        parsed.hostname)
        self.timeout_s = float(timeout_s)
        self.queue_size = int(queue_size)
        self.only_anomalous = bool(only_anomalous)
        self.close_timeout_s = float(close_timeout_s)
        self.retry_delay_s = float(retry_delay_s)
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._queue: collections.deque[tuple[int, bytes]] = collections.deque()  # (record number, body)
        self._seq = 0
        self._outage = _Outage(f"webhook {self.label}")
        self._cond = threading.Condition()
        self._busy = False
        self._stop = False
        self._closed = False
        handlers: list[Any] = [_RefuseRedirects()]
        if _is_loopback(parsed.hostname):
            handlers.append(urllib.request.ProxyHandler({}))
        self._opener = urllib.request.build_opener(*handlers)
        self._thread = threading.Thread(target=self._run, name="gradad-webhook", daemon=True)
        self._thread.start()

    def write_record(self, record: dict[str, Any]) -> None:
        """Queue any record (follow-ups included); never blocks."""
        if not _passes_filter(self.only_anomalous, record):
            return
        body = record_to_json(record).encode("utf-8")
        with self._cond:
            if self._closed:
                raise RuntimeError(f"WebhookSink({self.label}) is closed")
            self._seq += 1
            if len(self._queue) >= self.queue_size:
                self._queue.popleft()
                self.dropped += 1
                self._outage.failed(f"not keeping up: its queue of {self.queue_size} records is full, dropping "
                                    f"the oldest", self._seq)
            self._queue.append((self._seq, body))
            self._cond.notify_all()

    @property
    def pending(self) -> int:
        """Records queued or being sent."""
        with self._cond:
            return len(self._queue) + int(self._busy)

    def _post(self, body: bytes) -> None:
        req = urllib.request.Request(self.url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "gradad"})
        for name, value in self._headers.items():
            req.add_unredirected_header(name, value)  # never forwarded, even if a handler followed a redirect
        with self._opener.open(req, timeout=self.timeout_s) as resp:
            resp.read(WEBHOOK_REPLY_BYTES)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                seq, body = self._queue.popleft()
                self._busy = True
            try:
                for attempt in (1, 2):
                    try:
                        self._post(body)
                        self.sent += 1
                        self._outage.delivered(seq)
                        break
                    except Exception as e:  # noqa: BLE001 - network errors must never kill the thread
                        if attempt == 2 or self._stop:
                            self.failed += 1
                            self._outage.failed(f"POST failed: {_redacted_error(e, self.url, self.label)}", seq)
                            break
                        log.debug("webhook POST to %s failed (%s): retrying once", self.label,
                                  _redacted_error(e, self.url, self.label))
                        time.sleep(self.retry_delay_s)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def close(self) -> None:
        """Drain the queue (at most ``close_timeout_s``), then stop the thread. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            _wait_while(lambda: bool(self._queue or self._busy), self.close_timeout_s, self._cond.wait)
            left = len(self._queue)
            self._queue.clear()
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=2 * self.timeout_s + self.retry_delay_s + 1.0)
        if self._thread.is_alive():  # a POST still hanging (urllib's timeout is per socket call, DNS unbounded)
            with self._cond:
                left += int(self._busy)  # counted as dropped: never reported sent or failed
                self._busy = False
        if left:
            self.dropped += left
            log.warning("webhook %s: %d queued records not sent within %.1f s at shutdown", self.label, left,
                        self.close_timeout_s)
        self._log_totals(f"webhook {self.label}", f"{self.sent} sent, {self.failed} failed, {self.dropped} dropped",
                         self.failed + self.dropped)

    def delivery_report(self) -> dict[str, dict[str, Any]]:
        """``{"webhook": {target, sent, failed, dropped, records_lost, complete}}`` for the run summary."""
        return self._report("webhook", self.label, sent=self.sent, failed=self.failed, dropped=self.dropped)


class MqttSink(_RecordSink):
    """Publishes records as JSON to an MQTT broker with ``paho-mqtt`` (optional: ``pip install paho-mqtt``).

    Connects in the constructor (waiting up to ``connect_timeout_s`` for the broker's answer: a clear
    :class:`GradError` if it cannot), then paho's background network thread (``loop_start``) sends, so
    :meth:`write` never blocks on the network. paho reconnects by itself after a lost connection; QoS 1/2
    messages published meanwhile are queued (at most ``queue_size``, beyond that they are counted in
    ``dropped``) and sent on reconnection. A lost connection and the drops are logged once per outage (then at most
    every :data:`OUTAGE_LOG_EVERY_S`), and once when delivery works again; the counts go into the run summary.
    :meth:`close` waits up to ``close_timeout_s`` for pending publishes, then disconnects. ``tls`` (implied by
    ``ca_certs``, a PEM file of the CA that signed the broker's certificate; the system's CAs without it) encrypts
    the connection and verifies the broker; credentials sent without it to a broker that is not on this machine are
    warned about.
    """

    def __init__(self, host: str, port: int = 1883, topic: str = "gradad/results", qos: int = 1,
                 only_anomalous: bool = False, client_id: str | None = None, username: str | None = None,
                 password: str | None = None, keepalive: int = 30, queue_size: int = 1000,
                 connect_timeout_s: float = 5.0, close_timeout_s: float = 10.0, tls: bool = False,
                 ca_certs: str | None = None) -> None:
        if password and username is None:
            raise GradError("MQTT password given without a user name: set --mqtt-user (GRAD_MQTT_USER, "
                            "sinks.mqtt.username in a line file) too; without one the broker would be used "
                            "anonymously")
        try:
            import paho.mqtt.client as mqtt
        except ImportError as e:
            raise GradError("MQTT needs the optional dependency: pip install paho-mqtt") from e
        if qos not in (0, 1, 2):
            raise GradError(f"MQTT qos must be 0, 1 or 2, got {qos}")
        if not topic or any(c in topic for c in "#+"):
            raise GradError(f"MQTT topic must be a non-empty topic name without wildcards, got {topic!r}")
        self._mqtt = mqtt
        self.host, self.port, self.topic, self.qos = host, int(port), topic, int(qos)
        self.only_anomalous = bool(only_anomalous)
        self.close_timeout_s = float(close_timeout_s)
        self.published = 0
        self.dropped = 0
        self.queue_size = int(queue_size)
        self._pending: collections.deque[tuple[int, Any]] = collections.deque()  # (record number, paho info)
        self._seq = 0
        self._outage = _Outage(f"MQTT {host}:{self.port}")
        self._lock = threading.Lock()
        self._closed = False
        self._started = False  # connected once: until then a refusal is the constructor's one error, not a warning
        self._connected = threading.Event()
        self._connect_rc: Any = None

        tls = tls or ca_certs is not None
        client = self._new_client(client_id, username, password, tls, ca_certs)
        client.max_queued_messages_set(int(queue_size))
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        self._client = client
        try:
            client.connect(host, self.port, keepalive=int(keepalive))
        except (OSError, ValueError) as e:
            raise GradError(f"cannot connect to MQTT broker {host}:{self.port}{' over TLS' if tls else ''}: "
                            f"{e}") from e
        client.loop_start()
        if not self._connected.wait(connect_timeout_s) or not self._rc_ok(self._connect_rc):
            client.loop_stop()
            try:
                client.disconnect()
            except Exception:  # noqa: BLE001
                pass
            why = "no answer" if self._connect_rc is None else f"refused: {self._connect_rc}"
            raise GradError(f"cannot connect to MQTT broker {host}:{self.port} ({why})")
        self._started = True
        log.info("MQTT: publishing to %s:%d topic %r (qos %d%s)", host, self.port, topic, self.qos,
                 ", TLS" if tls else "")

    def _new_client(self, client_id: str | None, username: str | None, password: str | None, tls: bool,
                    ca_certs: str | None) -> Any:
        """A paho client with the credentials and, with ``tls``, an encrypted connection that verifies the broker."""
        mqtt = self._mqtt
        if hasattr(mqtt, "CallbackAPIVersion"):  # paho-mqtt >= 2
            client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or "")
        else:  # pragma: no cover - paho-mqtt 1.x
            client = mqtt.Client(client_id=client_id or "")
        if ca_certs is not None and not Path(ca_certs).is_file():
            raise GradError(f"MQTT CA certificate file not found: {ca_certs} (--mqtt-ca, sinks.mqtt.ca_certs)")
        if tls:
            try:
                client.tls_set(ca_certs=ca_certs)  # verifies the broker's certificate and host name
            except (OSError, ValueError) as e:  # ssl.SSLError is an OSError: an unreadable or invalid CA file
                raise GradError(f"MQTT TLS set-up failed ({e}) with CA file {ca_certs or '(system CAs)'}") from e
        elif cleartext_credentials(self.host, username):
            log.warning("MQTT: the user name and password for %s go over the network in clear text: use --mqtt-tls "
                        "(sinks.mqtt.tls) with a broker listening for TLS", self.host)
        if username is not None:
            client.username_pw_set(username, password)
        return client

    @staticmethod
    def _rc_ok(rc: Any) -> bool:
        if rc is None:
            return False
        is_failure = getattr(rc, "is_failure", None)
        return not is_failure if is_failure is not None else int(rc) == 0

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, *rest: Any) -> None:
        self._connect_rc = rc
        self._connected.set()
        if self._rc_ok(rc):
            log.debug("MQTT connected to %s:%d", self.host, self.port)
        elif self._started:  # at start-up the constructor's error says it
            self._outage.failed(f"the broker refused the reconnection: {rc}; retrying", self._seq, lost=0)

    def _on_disconnect(self, client: Any, userdata: Any, *args: Any) -> None:
        if self._started and not self._closed:  # at start-up: the refusal that the constructor reports
            reason = args[-2] if len(args) >= 2 else (args[0] if args else "?")
            self._outage.failed(f"connection lost ({reason}); reconnecting, records queued meanwhile (at most "
                                f"{self.queue_size}, newer ones dropped)", self._seq, lost=0)

    def _state(self, info: Any) -> bool | None:
        """True published, False still pending, None failed (not queued / no connection for QoS 0)."""
        try:
            return bool(info.is_published())
        except ValueError:  # outgoing queue full
            return None
        except RuntimeError:
            if self.qos > 0 and info.rc == self._mqtt.MQTT_ERR_NO_CONN:
                return bool(getattr(info, "_published", False))  # queued; resent on reconnection
            return None

    def _reap(self) -> None:
        while self._pending:
            seq, info = self._pending[0]
            state = self._state(info)
            if state is False:
                break
            self._pending.popleft()
            if state:
                self.published += 1
                self._outage.delivered(seq)
            else:
                self._dropped(info, seq)

    def _dropped(self, info: Any, seq: int) -> None:
        self.dropped += 1
        why = (f"the outgoing queue is full ({self.queue_size} records waiting for the broker)"
               if info.rc == self._mqtt.MQTT_ERR_QUEUE_SIZE else f"publish failed ({self._mqtt.error_string(info.rc)})")
        self._outage.failed(f"dropping records: {why}", seq)

    def write_record(self, record: dict[str, Any]) -> None:
        """Publish any record (follow-ups included); never blocks on the network."""
        if not _passes_filter(self.only_anomalous, record):
            return
        payload = record_to_json(record)
        with self._lock:
            if self._closed:
                raise RuntimeError(f"MqttSink({self.host}:{self.port}) is closed")
            info = self._client.publish(self.topic, payload, qos=self.qos)
            self._seq += 1
            if self._state(info) is None:  # not queued: counted now, not after the messages ahead of it
                self._dropped(info, self._seq)
            else:
                self._pending.append((self._seq, info))
            self._reap()

    def close(self) -> None:
        """Wait (at most ``close_timeout_s``) for pending publishes, then disconnect. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True

            def unconfirmed() -> bool:
                self._reap()
                return bool(self._pending)

            _wait_while(unconfirmed, self.close_timeout_s, lambda seconds: time.sleep(min(seconds, 0.01)))
            left = len(self._pending)
            self._pending.clear()
        self.dropped += left
        if left:
            log.warning("MQTT: %d messages not confirmed by %s:%d within %.1f s at shutdown", left, self.host,
                        self.port, self.close_timeout_s)
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
        self._log_totals(f"MQTT {self.host}:{self.port}", f"{self.published} published, {self.dropped} dropped",
                         self.dropped)

    def delivery_report(self) -> dict[str, dict[str, Any]]:
        """``{"mqtt": {target, published, dropped, records_lost, complete}}`` for the run summary."""
        return self._report("mqtt", f"{self.host}:{self.port}", published=self.published, dropped=self.dropped)
