"""Prometheus exposition shared by every service: the /metrics HTTP server and vLLM-name aliases.

Each service builds its metrics into a ``CollectorRegistry`` it is given (tests pass a fresh
one), then calls :func:`start_metrics_server` once from ``__main__``. The server runs on a
daemon thread and never touches the gRPC event loop.

vLLM names contain ``:`` (``vllm:num_requests_running``), which prometheus-client's metric
constructors reject by convention. :class:`AliasCollector` re-exports an existing metric family
under a second name at collection time, so both names always carry the same value and there is
exactly one place (the service's ``VLLM_NAME_MAP``) that records the mapping.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

__all__ = [
    "AliasCollector",
    "MetricsServer",
    "family_name",
    "new_registry",
    "serve_metrics",
    "start_metrics_server",
    "stop_metrics_server",
    "text_format_app",
]

_COUNTER_SUFFIX = "_total"


def new_registry() -> CollectorRegistry:
    """A fresh registry holding the standard process, GC and platform collectors.

    Each service instance gets its own (never the global ``prometheus_client.REGISTRY``), so
    several servers can share one process in tests without clashing or mixing counts.
    """
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def family_name(exposed_name: str, metric_type: str) -> str:
    """The family name prometheus-client uses for an exposed name (counters drop ``_total``)."""
    if metric_type == "counter" and exposed_name.endswith(_COUNTER_SUFFIX):
        return exposed_name[: -len(_COUNTER_SUFFIX)]
    return exposed_name


class AliasCollector(Collector):
    """Re-exports families of ``source`` collectors under alias names.

    ``aliases`` maps alias name -> source name, both as a user writes them in PromQL
    (counters with ``_total``, histograms and gauges by their base name). Several aliases
    may point at one source. Samples keep their labels; ``const_labels`` are added to every
    aliased sample (e.g. ``model_name``, which vLLM dashboards filter on).

    Invariant: an alias is produced from the source's samples during the same ``collect()``
    call, so the two names can never disagree within one scrape.
    """

    def __init__(
        self,
        sources: Iterable[Collector],
        aliases: Mapping[str, str],
        const_labels: Mapping[str, str] | None = None,
    ) -> None:
        self._sources = list(sources)
        self._aliases = dict(aliases)
        self._const_labels = dict(const_labels or {})

    def set_const_labels(self, const_labels: Mapping[str, str]) -> None:
        """Replace the labels added to every aliased sample (takes effect at the next scrape)."""
        self._const_labels = dict(const_labels)

    def describe(self) -> Iterator[Metric]:
        # Names only, so registering never runs the sources' collect() (and never clashes).
        for family in self._source_families():
            for alias in self._aliases_of(family):
                yield Metric(alias, family.documentation, family.type)

    def collect(self) -> Iterator[Metric]:
        for family in self._source_families():
            for alias in self._aliases_of(family):
                yield self._renamed(family, alias)

    def _source_families(self) -> Iterator[Metric]:
        for source in self._sources:
            yield from source.collect()

    def _aliases_of(self, family: Metric) -> Iterator[str]:
        for alias, source in self._aliases.items():
            if family_name(source, family.type) == family.name:
                yield family_name(alias, family.type)

    def _renamed(self, family: Metric, alias: str) -> Metric:
        renamed = Metric(alias, f"{family.documentation} (alias of {family.name})", family.type)
        for sample in family.samples:
            suffix = sample.name[len(family.name):]
            labels = {**sample.labels, **self._const_labels}
            renamed.samples.append(
                Sample(alias + suffix, labels, sample.value, sample.timestamp, sample.exemplar)
            )
        return renamed


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per scrape every few seconds would drown the service's own logs


@dataclass
class MetricsServer:
    """Handle on a running /metrics endpoint; ``stop()`` is idempotent."""

    host: str
    port: int
    _server: WSGIServer
    _thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()


def text_format_app(registry: CollectorRegistry) -> Callable[..., Iterable[bytes]]:
    """WSGI /metrics app that always answers in the Prometheus text format 0.0.4.

    Prometheus asks for OpenMetrics first, and prometheus-client's OpenMetrics writer
    rewrites ``:`` in sample names to ``_`` (its default "underscores" escaping), which
    would turn ``vllm:num_requests_running`` into ``vllm_num_requests_running``. The text
    format keeps the names as registered, so the Accept header is dropped before the
    client library negotiates.
    """
    app = make_wsgi_app(registry)

    def text_only(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        environ.pop("HTTP_ACCEPT", None)
        return app(environ, start_response)

    return text_only


def serve_metrics(port: int, registry: CollectorRegistry, host: str = "127.0.0.1") -> MetricsServer:
    """Serve ``registry`` at ``http://host:port/metrics`` on a daemon thread (port 0: any free)."""
    app = text_format_app(registry)
    server = make_server(host, port, app, _ThreadingWSGIServer, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return MetricsServer(host=host, port=server.server_port, _server=server, _thread=thread)


_RUNNING: dict[int, MetricsServer] = {}


def start_metrics_server(
    port: int, registry: CollectorRegistry, host: str = "127.0.0.1"
) -> int:
    """Start serving ``registry`` and return the bound port; stop it with
    :func:`stop_metrics_server`.

    Use :func:`serve_metrics` when you want the handle itself.
    """
    server = serve_metrics(port, registry, host)
    _RUNNING[server.port] = server
    return server.port


def stop_metrics_server(port: int) -> None:
    """Stop the server that :func:`start_metrics_server` returned ``port`` for (no-op if none)."""
    server = _RUNNING.pop(port, None)
    if server is not None:
        server.stop()
