"""A real OTLP/HTTP trace receiver on loopback: decodes the collector
protocol's protobuf ``ExportTraceServiceRequest`` like an OpenTelemetry
Collector would, and keeps the spans for the test to inspect."""

from __future__ import annotations

from dataclasses import dataclass, field

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import Site


def _value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@dataclass
class ReceivedSpan:
    name: str
    trace_id: int
    span_id: int
    parent_span_id: int | None
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind (2 server, 3 client)
    start_ns: int
    end_ns: int
    status_code: int  # 0 unset, 1 ok, 2 error
    attributes: dict
    resource: dict
    scope: str


@dataclass
class Receiver:
    requests: list[ExportTraceServiceRequest] = field(default_factory=list)
    spans: list[ReceivedSpan] = field(default_factory=list)
    content_types: list[bytes] = field(default_factory=list)
    status: int = 200  # what to answer (503: a collector in trouble)
    port: int = 0
    _listener: object = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def wait_for(self, n: int, timeout: float = 10.0) -> list[ReceivedSpan]:
        waited = 0.0
        while len(self.spans) < n:
            if waited > timeout:
                raise AssertionError(f"{len(self.spans)} spans received, expected {n}")
            await deferLater(reactor, 0.05)
            waited += 0.05
        return self.spans

    def by_name(self, name: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.name == name]

    def stop(self) -> Deferred:
        return self._listener.stopListening()


class _Traces(Resource):
    isLeaf = True

    def __init__(self, receiver: Receiver) -> None:
        super().__init__()
        self.receiver = receiver

    def render_POST(self, request) -> bytes:
        r = self.receiver
        r.content_types.append(request.getHeader(b"content-type") or b"")
        if r.status != 200:
            request.setResponseCode(r.status)
            return b""
        message = ExportTraceServiceRequest()
        message.ParseFromString(request.content.read())
        r.requests.append(message)
        for rs in message.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    r.spans.append(
                        ReceivedSpan(
                            name=s.name,
                            trace_id=int.from_bytes(s.trace_id, "big"),
                            span_id=int.from_bytes(s.span_id, "big"),
                            parent_span_id=(
                                int.from_bytes(s.parent_span_id, "big")
                                if s.parent_span_id
                                else None
                            ),
                            kind=s.kind,
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                            status_code=s.status.code,
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            resource=resource,
                            scope=ss.scope.name,
                        )
                    )
        request.setHeader(b"content-type", b"application/x-protobuf")
        return ExportTraceServiceResponse().SerializeToString()


def start_receiver() -> Receiver:
    receiver = Receiver()
    root = Resource()
    v1 = Resource()
    root.putChild(b"v1", v1)
    v1.putChild(b"traces", _Traces(receiver))
    receiver._listener = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    receiver.port = receiver._listener.getHost().port
    return receiver
