"""
Per-message traces with OpenTelemetry (the optional extra C{mailfw[otel]}).

One trace follows one message: the C{smtp.receive} span runs from MAIL to
the reply after the end of data, with a child span for each policy check
(C{policy.STAGE}, one per policy asked), for each routing question
(C{route}) and for the queue commit (C{enqueue}).  The W3C C{traceparent}
of the receive span is stored with the queued message
(L{mailfw.envelope.Envelope.traceparent}), so each delivery attempt, even
a retry days later in another process, is a C{delivery} span of the same
trace, with the agent's own steps (C{dns}, C{connect}, C{tls} and
C{smtp.transaction} for the SMTP relay) below it.

Tracing is on only when the environment asks for it the standard way:
C{OTEL_TRACES_EXPORTER} names one or more exporters (C{console}, C{otlp},
or any installed C{opentelemetry_traces_exporter} entry point) and
C{OTEL_SDK_DISABLED} is not C{true}.  The exporter, the sampler and the
resource then come from the SDK's own handling of the C{OTEL_*} variables;
spans are exported from the SDK's batch thread, never the reactor's.

When tracing is off, nothing of OpenTelemetry is imported, and every
helper here returns at its first test of L{_tracer} without creating an
object: the cost per message is a few attribute reads.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = [
    "TracingUnavailable",
    "childSpan",
    "configureFromEnvironment",
    "continueSpan",
    "disable",
    "enable",
    "enabled",
    "endSpan",
    "shutdown",
    "startSpan",
    "tracedCall",
    "tracedDeferred",
    "traceparentOf",
]

_T = TypeVar("_T")

# The OpenTelemetry tracer while tracing is on, else None: the one test on
# every hot path.
_tracer: Any = None
_provider: Any = None

INSTRUMENTATION_NAME = "mailfw"


class TracingUnavailable(Exception):
    """
    The environment asks for traces but they cannot be made: the
    C{mailfw[otel]} extra is not installed, or an exporter it names is
    unknown.  Raised at start-up, with the reason as its message.
    """


def enabled() -> bool:
    """
    Whether spans are being made.
    """
    return _tracer is not None


def enable(provider: Any) -> None:
    """
    Make spans with C{provider}, an OpenTelemetry C{TracerProvider}
    (tests give one with an in-memory exporter).
    """
    global _tracer, _provider
    _provider = provider
    _tracer = provider.get_tracer(INSTRUMENTATION_NAME)


def disable() -> None:
    """
    Stop making spans (the provider is left as it is).
    """
    global _tracer, _provider
    _tracer = _provider = None


def configureFromEnvironment(environ: Mapping[str, str] | None = None) -> bool:
    """
    Turn tracing on if C{environ} (the process environment by default)
    asks for it; see the module docstring.

    @return: whether tracing is now on.
    @raise TracingUnavailable: if traces are asked for but cannot be made.
    """
    environ = os.environ if environ is None else environ
    names = environ.get("OTEL_TRACES_EXPORTER", "").strip()
    if not names or names.lower() == "none":
        return False
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    try:
        # The SDK's own reading of OTEL_TRACES_EXPORTER (with
        # OTEL_EXPORTER_OTLP_PROTOCOL) and its entry points; the provider
        # reads the sampler and resource variables itself.
        from opentelemetry.sdk._configuration import _get_exporter_names, _import_exporters
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as e:
        raise TracingUnavailable(
            f"OTEL_TRACES_EXPORTER={names} but OpenTelemetry is not installed"
            f" (pip install 'mailfw[otel]'): {e}"
        ) from None
    try:
        exporters, _, _ = _import_exporters(_get_exporter_names("traces"), [], [])
        provider = TracerProvider()
        for exporterClass in exporters.values():
            provider.add_span_processor(BatchSpanProcessor(exporterClass()))
    except Exception as e:
        raise TracingUnavailable(f"OTEL_TRACES_EXPORTER={names}: {e}") from None
    enable(provider)
    return True


def shutdown() -> None:
    """
    Export what is left and stop the exporters.  Blocks while the last
    spans are sent: call it in a thread.
    """
    provider = _provider
    disable()
    if provider is not None and hasattr(provider, "shutdown"):
        provider.shutdown()


def startSpan(
    name: str,
    parent: Any = None,
    traceparent: str = "",
    attributes: Mapping[str, object] | None = None,
) -> Any:
    """
    Start a span, or do nothing when tracing is off.

    @param parent: the parent span (from L{startSpan}), or C{None}.
    @param traceparent: when there is no C{parent}, a W3C C{traceparent}
        to continue (L{traceparentOf}); a new trace when empty or invalid.
    @return: the span, or C{None} when tracing is off.
    """
    tracer = _tracer
    if tracer is None:
        return None
    from opentelemetry import trace

    context = None
    if parent is not None:
        context = trace.set_span_in_context(parent)
    elif traceparent:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        context = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
    return tracer.start_span(name, context=context, attributes=_attributes(attributes))


def childSpan(parent: Any, name: str, attributes: Mapping[str, object] | None = None) -> Any:
    """
    Start a child span of C{parent}; C{None} (no span) when C{parent} is
    C{None}, that is, when the work belongs to no trace.
    """
    if parent is None or _tracer is None:
        return None
    return startSpan(name, parent, attributes=attributes)


def continueSpan(traceparent: str, name: str, attributes: Mapping[str, object] | None = None) -> Any:
    """
    Start a span below the one C{traceparent} names (a delivery agent's
    steps below the scheduler's attempt, L{mailfw.envelope.Envelope}); no
    span when tracing is off or C{traceparent} is empty.
    """
    if not traceparent or _tracer is None:
        return None
    return startSpan(name, traceparent=traceparent, attributes=attributes)


def _attributes(attributes: Mapping[str, object] | None) -> dict[str, Any] | None:
    """
    Span attributes: OpenTelemetry takes only strings, numbers and
    booleans; C{None} values are left out.
    """
    if not attributes:
        return None
    return {
        key: value if isinstance(value, str | bool | int | float) else str(value)
        for key, value in attributes.items()
        if value is not None
    }


def endSpan(
    span: Any,
    code: int | None = None,
    enhanced: str = "",
    error: str | None = None,
    attributes: Mapping[str, object] | None = None,
) -> None:
    """
    End C{span} (nothing for C{None}), recording the SMTP reply that ended
    it: a 4xx or 5xx C{code}, or an C{error}, marks the span failed.
    """
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    extra = _attributes(attributes)
    if extra:
        span.set_attributes(extra)
    if code is not None:
        span.set_attribute("smtp.reply.code", code)
        if enhanced:
            span.set_attribute("smtp.reply.enhanced", enhanced)
        if code >= 400 and error is None:
            error = f"{code} {enhanced}".strip()
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end()


def traceparentOf(span: Any) -> str:
    """
    The W3C C{traceparent} of C{span}, to store or hand on; empty for
    C{None}.
    """
    if span is None:
        return ""
    context = span.get_span_context()
    if not context.is_valid:
        return ""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def tracedDeferred(span: Any, d: Any, code: Callable[[Any], int | None] | None = None) -> Any:
    """
    End C{span} when the L{Deferred} C{d} fires: with the reply code
    C{code(result)} gives, or as failed if C{d} fails.  Returns C{d},
    whose result is unchanged.
    """
    if span is None:
        return d

    def succeeded(result: _T) -> _T:
        endSpan(span, code(result) if code is not None else None)
        return result

    def failed(f: Any) -> Any:
        endSpan(span, error=f.getErrorMessage() or f.type.__name__)
        return f

    return d.addCallbacks(succeeded, failed)


def tracedCall(parent: Any, stage: str, call: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """
    Wrap a policy chain call (C{call(policy)}) so that each policy asked
    gets its own child span of C{parent}, C{policy.STAGE}, ended with the
    verdict's reply.  C{call} itself when tracing is off.
    """
    if parent is None or _tracer is None:
        return call
    from twisted.internet.defer import Deferred

    def traced(policy: Any) -> Any:
        span = childSpan(parent, f"policy.{stage}", {"mailfw.policy": getattr(policy, "name", "")})
        try:
            result = call(policy)
        except BaseException as e:
            endSpan(span, error=str(e) or type(e).__name__)
            raise
        if isinstance(result, Deferred):
            return tracedDeferred(span, result, _verdictCode)
        endSpan(span, _verdictCode(result))
        return result

    return traced


def _verdictCode(verdict: Any) -> int | None:
    reply = getattr(verdict, "reply", None)
    return getattr(reply, "code", None)
