"""The Flask app: one URL map, routed by the port a request arrived on.

Both providers live in one app served by one gunicorn bound to two ports.
Which provider answers is decided by the *listening* port (``SERVER_PORT``,
which gunicorn takes from the listener socket), never by the Host header,
which behind nginx is the public name. The URL map uses host matching with
the provider's name standing in for the host, so a rule of one provider can
never match on the other's port.
"""

from __future__ import annotations

import json
import logging

from flask import Blueprint, Flask, Request, Response, request
from werkzeug.exceptions import HTTPException
from werkzeug.routing import BaseConverter, MapAdapter

from shim import logs, metrics, status
from shim.access import AccessLog
from shim.errors import BadRequest, GatewayError, MethodNotAllowed, NotFound, PayloadTooLarge
from shim.prices import PriceTable
from shim.prices import table as price_table
from shim.providers.base import Provider
from shim.services import build_services
from shim.settings import Settings
from shim.web import error_response, make_blueprint

log = logging.getLogger("shim")

# Where a request on an unknown port is routed: no rule has this host.
NO_PROVIDER = "none"
# The metrics port's routes (loopback by default; see shim.metrics).
METRICS = "metrics"


def _metrics_blueprint(
    multiprocess_dir: str | None, prices: PriceTable | None = None, plan_usd: float | None = None
) -> Blueprint:
    blueprint = Blueprint(METRICS, __name__)

    def scrape() -> Response:
        body, content_type = metrics.exposition(multiprocess_dir)
        return Response(body, content_type=content_type)

    # The status page (issue #17): the same families, rendered for a person.
    rates = status.Rates()

    def page() -> Response:
        metrics.flush()  # this worker's per-client sums, so the page is current
        html = status.render(
            metrics.families(multiprocess_dir), rates, prices=prices, plan_usd=plan_usd
        )
        return Response(html, content_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "no-store"})

    blueprint.add_url_rule("/metrics", "scrape", scrape, methods=["GET"], host=METRICS)
    blueprint.add_url_rule("/", "status_root", page, methods=["GET"], host=METRICS)
    blueprint.add_url_rule("/status", "status", page, methods=["GET"], host=METRICS)
    return blueprint


class ModelIdConverter(BaseConverter):
    """A model id: starts with a letter or digit, then letters, digits, ``.``, ``_``, ``-``.

    Dots are allowed (``gemini-2.5-flash``) but not first, so ``..`` and
    ``.hidden`` never match and a decoded ``%2e%2e`` cannot walk the path.
    """

    regex = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"


class ShimFlask(Flask):
    """Flask whose URL adapter is bound to the provider owning the listening port."""

    providers_by_port: dict[str, Provider]
    metrics_port: str | None = None

    def create_url_adapter(self, request: Request | None) -> MapAdapter | None:
        if request is None:
            return super().create_url_adapter(request)
        port = request.environ.get("SERVER_PORT", "")
        provider = self.providers_by_port.get(port)
        if provider is not None:
            host = provider.name
        else:
            host = METRICS if port == self.metrics_port else NO_PROVIDER
        return self.url_map.bind(
            host,
            script_name=request.script_root or None,
            url_scheme=request.scheme,
            default_method=request.method,
            path_info=request.environ.get("PATH_INFO") or "/",
            query_args=request.environ.get("QUERY_STRING", ""),
        )

    def provider_for(self, environ: dict) -> Provider | None:
        return self.providers_by_port.get(environ.get("SERVER_PORT", ""))


def build_app(settings: Settings | None = None) -> ShimFlask:
    settings = settings or Settings.from_env()
    logs.configure(settings.secrets(), settings.log_format)

    app = ShimFlask(__name__, static_folder=None, host_matching=True, static_host=None)
    app.url_map.converters["model_id"] = ModelIdConverter
    # `//v1//messages` must be a 404, not a redirect a client might follow.
    app.url_map.merge_slashes = False
    app.json.sort_keys = False

    services = build_services(settings)
    app.providers_by_port = services.providers_by_port
    app.metrics_port = str(settings.metrics_port) if settings.metrics_port else None
    for provider in services.providers:
        blueprint = make_blueprint(
            provider, services.clients, services.forwarder.forward, services.throttle,
            services.limiter,
        )
        blueprint.add_url_rule(
            "/health/ready", "ready", services.readiness.response, methods=["GET"],
            host=provider.name,
        )
        app.register_blueprint(blueprint)
    app.register_blueprint(
        _metrics_blueprint(
            settings.metrics_dir,
            price_table(settings.prices_file),
            settings.subscription_usd_month,
        )
    )
    names = {port: provider.name for port, provider in app.providers_by_port.items()}
    app.wsgi_app = AccessLog(  # type: ignore[method-assign]
        app.wsgi_app, names.get, services.end_of_request, settings.trusted_proxies
    )

    @app.before_request
    def check_and_record_route() -> None:
        # Werkzeug's matcher ignores extra leading slashes, so `//v1/messages`
        # would match `/v1/messages` and then be forwarded as `//v1/...`.
        if request.environ.get("PATH_INFO", "").startswith("//"):
            raise NotFound()
        # Before the secret check, so a 401 is logged with its route too; the
        # template, never the raw path (bounded labels, no ids in metrics).
        record = request.environ["shim.record"]
        record.route = request.url_rule.rule if request.url_rule else None
        args = request.view_args
        if args:
            record.model = args.get("model")

    _register_error_handlers(app)
    ports = {provider.name: int(port) for port, provider in app.providers_by_port.items()}
    log.info(
        "shim ready",
        extra={
            "event": "app_ready",
            "providers": {
                provider.name: {**provider.describe(), "port": ports[provider.name]}
                for provider in services.providers
            },
            "state": repr(services.state),
        },
    )
    for warning in settings.warnings:
        log.warning(warning, extra={"event": "config_warning"})
    for provider in services.providers:
        if not provider.configured:
            log.warning(
                "provider has no upstream credential; its calls answer 503",
                extra={"event": "provider_not_configured", "provider": provider.name},
            )
    return app


def _register_error_handlers(app: ShimFlask) -> None:
    """Render every error in the shape of the provider whose port it arrived on."""

    def render(error: GatewayError) -> Response:
        provider = app.provider_for(request.environ)
        if provider is None:
            body = {"error": {"code": error.status, "message": error.message}}
            return Response(json.dumps(body), status=error.status, mimetype="application/json")
        return error_response(provider, error)

    @app.errorhandler(GatewayError)
    def gateway_error(error: GatewayError) -> Response:
        return render(error)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        code = error.code or 500
        if code == 404:
            return render(NotFound())
        if code == 405:
            allowed = ", ".join(getattr(error, "valid_methods", None) or ())
            return render(MethodNotAllowed(headers=(("Allow", allowed),) if allowed else ()))
        if code == 413:
            return render(PayloadTooLarge())
        if 400 <= code < 500:
            return render(BadRequest())
        log.error("unexpected HTTP error", extra={"event": "http_error", "status": code})
        return render(GatewayError())

    @app.errorhandler(Exception)
    def unexpected(error: Exception) -> Response:
        # Last resort: the traceback goes to the log, the client gets a fixed message.
        log.exception("unhandled error", extra={"event": "unhandled_error"})
        return render(GatewayError())
