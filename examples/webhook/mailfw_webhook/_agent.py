"""
The C{webhook} delivery agent: each delivery attempt POSTs the message to
an HTTP endpoint.

What the endpoint receives, one request per delivery attempt (all the
recipients the queue hands over together, which share a route)::

    POST /inbox HTTP/1.1
    Content-Type: message/rfc822
    Content-Length: 1234
    X-Mail-From: alice@example.org
    X-Rcpt-To: bob@hooks.example.org
    X-Rcpt-To: carol@hooks.example.org
    X-Mail-Queue-ID: 4f1c0a9e2b

    (the message as queued: header section and body, CRLF line ends)

  - C{X-Mail-From} is the envelope sender, C{<>} for the null sender of
    a bounce (a real address never looks like that).
  - C{X-Rcpt-To} is repeated, one header line per recipient, in envelope
    order; most frameworks give them as a list (Python's
    C{headers.get_all("X-Rcpt-To")}).  One line each keeps every value a
    plain address, with no second syntax (JSON, quoting) to parse.
  - Addresses of an SMTPUTF8 message are sent as UTF-8.
  - C{X-Mail-Queue-ID} is sent when the queue has assigned an ID.  A
    request can succeed at the endpoint while its answer is lost, and the
    queue then tries again: the queue ID and the recipient let the
    endpoint recognise a copy it already has.

How the answer becomes one SMTP reply for every recipient of the request
(L{replyForStatus}); a 4xx reply makes the queue try again later, a 5xx
one bounces the message to its sender:

  - 2xx: C{250 2.0.0}, delivered.
  - 408 (the endpoint gave up reading): C{451 4.4.2}; 429 (too many
    requests): C{451 4.4.5}.
  - 413 (too large): C{552 5.3.4}; any other 4xx: C{554 5.0.0}.  A 4xx is
    the endpoint refusing this request as it stands, which sending it
    again unchanged will not fix.  That includes 401, 403 and 404, which
    usually mean the configuration is wrong: check the logs.
  - 5xx: C{451 4.4.0}, the endpoint failed for now.
  - Anything else (redirects are not followed): C{451 4.4.0}, so mail
    waits in the queue while the operator fixes the URL.
  - No connection (refused, DNS failure): C{451 4.4.1}; connection lost
    or no answer within C{timeout} seconds: C{451 4.4.2}.
  - The queued message cannot be read: C{451 4.3.0}, a local fault.

The body is streamed with L{IMessageBody.produce}, which reads it off the
reactor thread a piece at a time and stops while the connection is
paused; L{_MessageProducer} adapts it to what
L{twisted.web.client.Agent} expects of a request body.

The URL is never logged, since its query may hold an access token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IConsumer, IProducer, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseFailed,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer
from zope.interface import implementer

from mailfw.config import ConfigError, Section
from mailfw.envelope import Envelope, RecipientOutcome
from mailfw.interfaces import IDeliveryAgent, IMessageBody
from mailfw.reply import SMTPReply

if TYPE_CHECKING:
    from mailfw.config import ComponentContext

__all__ = ["DEFAULT_TIMEOUT", "WebhookAgent", "fromConfig", "replyForStatus"]

DEFAULT_TIMEOUT = 30.0

NOT_READABLE = SMTPReply(451, "4.3.0", "Local error reading the message, try again later")
NO_CONNECTION = SMTPReply(451, "4.4.1", "Webhook not reachable, try again later")
BAD_CONNECTION = SMTPReply(451, "4.4.2", "Webhook connection lost, try again later")
TIMED_OUT = SMTPReply(451, "4.4.2", "Webhook did not answer in time, try again later")


def replyForStatus(status: int) -> SMTPReply:
    """
    The reply for every recipient of a request the endpoint answered with
    HTTP C{status} (see the module docstring for the reasons).
    """
    answer = f"(HTTP {status})"
    if 200 <= status < 300:
        return SMTPReply(250, "2.0.0", f"Webhook accepted the message {answer}")
    if status == 408:
        return SMTPReply(451, "4.4.2", f"Webhook timed out reading the message {answer}")
    if status == 429:
        return SMTPReply(451, "4.4.5", f"Webhook is busy, try again later {answer}")
    if status == 413:
        return SMTPReply(552, "5.3.4", f"Message too large for the webhook {answer}")
    if 400 <= status < 500:
        return SMTPReply(554, "5.0.0", f"Webhook refused the message {answer}")
    if 500 <= status < 600:
        return SMTPReply(451, "4.4.0", f"Webhook failed, try again later {answer}")
    return SMTPReply(451, "4.4.0", f"Unexpected answer from the webhook {answer}")


class _Discard(Protocol):
    """
    Receives and drops a response body: the status code is the whole
    answer, and reading the body lets the connection close cleanly.
    """

    def dataReceived(self, data: bytes) -> None:
        pass


@implementer(IBodyProducer, IConsumer)
class _MessageProducer:
    """
    A request body from L{IMessageBody.produce}.  The HTTP client registers
    this object on the connection and gives it a consumer that only takes
    writes; the body's own producer registers here instead, and gets the
    connection's pause, resume and stop passed on.
    """

    def __init__(self, body: IMessageBody) -> None:
        self.length = body.size
        self._body = body
        self._consumer: IConsumer | None = None
        self._producer: IPushProducer | None = None
        self._paused = False
        self._stopped = False

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._consumer = consumer

        def failed(failure: Failure) -> Failure | Deferred[None]:
            if self._stopped:
                # Like FileBodyProducer: once stopped by the client, the
                # result never fires (the request fails on its own).
                return Deferred()
            return failure

        return self._body.produce(self).addErrback(failed)

    # IConsumer, for the body's producer.
    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        # IMessageBody.produce registers a streaming (push) producer.
        pushing = self._producer = IPushProducer(producer)
        if self._stopped:
            pushing.stopProducing()
        elif self._paused:
            pushing.pauseProducing()

    def unregisterProducer(self) -> None:
        self._producer = None

    def write(self, data: bytes) -> None:
        assert self._consumer is not None
        self._consumer.write(data)

    # IPushProducer, for the connection.
    def pauseProducing(self) -> None:
        self._paused = True
        if self._producer is not None:
            self._producer.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        if self._producer is not None:
            self._producer.resumeProducing()

    def stopProducing(self) -> None:
        self._stopped = True
        if self._producer is not None:
            self._producer.stopProducing()


@implementer(IDeliveryAgent)
class WebhookAgent:
    """
    Delivers by POSTing each message to one URL (see the module docstring).

    @ivar name: the instance name, C{hook} for C{[delivery.hook]}.
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        url: str,
        http: IAgent,
        clock: IReactorTime,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        """
        @param url: an absolute C{http} or C{https} URL in ASCII, already
            checked (L{fromConfig} does that).
        @param http: makes the requests; L{fromConfig} passes a
            L{twisted.web.client.Agent}, tests a fake.
        @param clock: times out requests that take longer than C{timeout}
            seconds, connecting included.
        """
        self.name = name
        self._uri = url.encode("ascii")
        self._host = urlsplit(url).hostname
        self._http = http
        self._clock = clock
        self._timeout = timeout

    def deliver(
        self, envelope: Envelope, body: IMessageBody, nexthop: str | None
    ) -> Deferred[Sequence[RecipientOutcome]]:
        """
        POST C{body} with C{envelope}'s addresses.  C{nexthop} is not used:
        the configured URL is the destination.
        """
        return Deferred.fromCoroutine(self._deliver(envelope, body, nexthop))

    async def _deliver(
        self, envelope: Envelope, body: IMessageBody, nexthop: str | None
    ) -> Sequence[RecipientOutcome]:
        if not envelope.recipients:
            return []
        reply, status = await self._post(envelope, body)
        remote = self._host if status is not None else None
        return self._outcomes(envelope, nexthop, reply, status, remote)

    async def _post(self, envelope: Envelope, body: IMessageBody) -> tuple[SMTPReply, int | None]:
        """
        Send one request; return the reply for its recipients and the HTTP
        status, or C{None} for the status when no answer came.
        """
        producer = _MessageProducer(body)
        requested = self._http.request(b"POST", self._uri, self._headers(envelope), producer)
        requested.addTimeout(self._timeout, self._clock)
        try:
            response = await requested
        except defer.TimeoutError as e:
            self._warn(envelope, "no answer in time", e)
            return TIMED_OUT, None
        except (ConnectError, DNSLookupError) as e:
            self._warn(envelope, "cannot connect", e)
            return NO_CONNECTION, None
        except RequestGenerationFailed as e:
            # Reading the message failed part-way (the producer's error).
            self._warn(envelope, "cannot read the queued message", e)
            return NOT_READABLE, None
        except (RequestTransmissionFailed, ResponseFailed) as e:
            self._warn(envelope, "connection failed", e)
            return BAD_CONNECTION, None
        response.deliverBody(_Discard())
        return replyForStatus(response.code), response.code

    def _headers(self, envelope: Envelope) -> Headers:
        sender = envelope.senderText or "<>"
        headers = Headers()
        headers.setRawHeaders(b"content-type", [b"message/rfc822"])
        headers.setRawHeaders(b"x-mail-from", [sender.encode("utf-8")])
        headers.setRawHeaders(b"x-rcpt-to", [str(r.address).encode("utf-8") for r in envelope.recipients])
        if envelope.queueID:
            headers.setRawHeaders(b"x-mail-queue-id", [envelope.queueID.encode("ascii")])
        return headers

    def _outcomes(
        self,
        envelope: Envelope,
        nexthop: str | None,
        reply: SMTPReply,
        status: int | None,
        remote: str | None,
    ) -> list[RecipientOutcome]:
        outcomes = []
        for recipient in envelope.recipients:
            self.log.info(
                "{agent}: {recipient} from {sender}: {code} {enhanced} ({answer})",
                agent=self.name,
                queueID=envelope.queueID,
                sender=envelope.senderText,
                recipient=str(recipient.address),
                nexthop=nexthop,
                code=reply.code,
                enhanced=reply.enhanced,
                status=status,
                answer="no HTTP answer" if status is None else f"HTTP {status}",
            )
            outcomes.append(RecipientOutcome(recipient, reply, remoteMTA=remote))
        return outcomes

    def _warn(self, envelope: Envelope, what: str, error: Exception) -> None:
        reasons = getattr(error, "reasons", None)
        if isinstance(reasons, list):
            # ResponseFailed and its kin wrap the real causes.
            detail = ", ".join(type(r.value).__name__ for r in reasons if isinstance(r, Failure))
        else:
            detail = str(error)
        self.log.warn(
            "{agent}: message {queueID}: {what}: {error} ({detail})",
            agent=self.name,
            queueID=envelope.queueID,
            what=what,
            error=type(error).__name__,
            detail=detail,
        )


def _checkURL(title: str, url: str) -> str:
    """
    Refuse, at start-up, a URL that could never work.
    """
    if not url.isascii() or not url.isprintable() or any(c.isspace() for c in url):
        raise ConfigError(
            f"{title} url: must be ASCII without spaces "
            "(write an international host name in its xn-- form, percent-encode the path)"
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"{title} url: must start with http:// or https://")
    if not parts.hostname:
        raise ConfigError(f"{title} url: names no host")
    if "@" in parts.netloc:
        raise ConfigError(f"{title} url: user:password@ in the URL is not supported")
    try:
        _ = parts.port  # parses the port, raising ValueError if it is bad
    except ValueError:
        raise ConfigError(f"{title} url: bad port") from None
    return url


def fromConfig(context: ComponentContext, instanceName: str, options: Mapping[str, object]) -> WebhookAgent:
    """
    Build a L{WebhookAgent} from C{[delivery.NAME]}: C{url} (required,
    C{http} or C{https}) and C{timeout} (seconds for the whole request,
    connecting included; default 30, at least 1).

    @raise ConfigError: naming the bad option.
    """
    section = Section(f"[delivery.{instanceName}]", options)
    url = _checkURL(section.title, section.text("url"))
    timeout = section.number("timeout", DEFAULT_TIMEOUT, minimum=1)
    section.finish()
    return WebhookAgent(instanceName, url, Agent(context.reactor), context.reactor, timeout=timeout)
