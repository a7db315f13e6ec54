"""An OpenTelemetry SDK pipeline kept in memory, for the contrib.otel tests."""

from __future__ import annotations

from typing import Any, Dict, List

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind


class Telemetry:
    """A tracer provider with an in-memory exporter and a meter provider with an in-memory reader."""

    def __init__(self) -> None:
        self.spans_out = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans_out))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def spans(self) -> List[ReadableSpan]:
        return list(self.spans_out.get_finished_spans())

    def call_spans(self) -> List[ReadableSpan]:
        return [s for s in self.spans() if s.kind == SpanKind.CLIENT]

    def call_span(self) -> ReadableSpan:
        calls = self.call_spans()
        assert len(calls) == 1, [s.name for s in self.spans()]
        return calls[0]

    def children(self, parent: ReadableSpan) -> List[ReadableSpan]:
        """The attempt spans of one call, in the order they ended."""
        return [s for s in self.spans() if s.parent is not None and s.parent.span_id == parent.context.span_id]

    def metrics(self) -> Dict[str, Any]:
        data = self.reader.get_metrics_data()
        found: Dict[str, Any] = {}
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    found[metric.name] = metric
        return found

    def points(self, name: str) -> List[Any]:
        metric = self.metrics().get(name)
        return list(metric.data.data_points) if metric else []

    def exported_text(self) -> str:
        """Everything exported, as text: spans as JSON and every metric point's attributes."""
        text = "\n".join(s.to_json() for s in self.spans())
        for metric in self.metrics().values():
            text += "\n" + metric.name + "".join(str(dict(p.attributes)) for p in metric.data.data_points)
        return text
