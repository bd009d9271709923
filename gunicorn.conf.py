"""gunicorn settings for shim; read by the master process only.

Never import requests, ssl, flask or the app here: gevent patches each worker
at boot, and anything imported in the master before that is left unpatched
(gunicorn #2796, #1566). ``shim.settings`` is safe: standard library only, and
loading it here means the ports are bound from the same validated settings the
app uses, and a bad environment stops the master with one clear message.
No ``preload_app`` for the same reason.
"""

import logging
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from shim import openfiles  # noqa: E402
from shim.logs import gunicorn_logconfig  # noqa: E402
from shim.settings import ConfigError, Settings  # noqa: E402
from shim.shared_table import FailureTable  # noqa: E402

try:
    _settings = Settings.from_env(os.environ)
except ConfigError as _error:
    sys.stderr.write(f"shim: {_error}\n")
    sys.exit(2)

# Both providers, one server: the app tells them apart by listening port. The
# metrics port comes last, on its own (loopback) address.
bind = [
    f"{_settings.bind_host}:{_settings.anthropic_port}",
    f"{_settings.bind_host}:{_settings.gemini_port}",
]
if _settings.metrics_port:
    bind.append(f"{_settings.metrics_host}:{_settings.metrics_port}")

# prometheus-client's multiprocess mode: every worker writes its samples to
# files here and a scrape on any worker reads them all. A fresh directory per
# start, so a restart never reports the dead processes' counts twice. Only per
# start: a SIGHUP reload runs this file again in the same master, and emptying
# the directory then dropped every counter, the running workers' too (#19).
_metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
_reloaded = os.environ.get("_SHIM_METRICS_DIR_OF") == str(os.getpid())
if _metrics_dir:
    os.makedirs(_metrics_dir, exist_ok=True)
    for _name in [] if _reloaded else os.listdir(_metrics_dir):
        if _name.endswith(".db"):
            os.remove(os.path.join(_metrics_dir, _name))
else:
    _metrics_dir = tempfile.mkdtemp(prefix="shim-metrics-")
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir
os.environ["_SHIM_METRICS_DIR_OF"] = str(os.getpid())  # this master set it up


def on_starting(server):  # noqa: ANN001, ANN201 - gunicorn hook
    # Two descriptors per stream (issue #14): raise the soft limit the workers
    # inherit, or warn at start rather than fail with EMFILE under load.
    openfiles.check(_settings.worker_connections, logging.getLogger("gunicorn.error"))


def child_exit(server, worker):  # noqa: ANN001, ANN201 - gunicorn hook
    # A dead worker's live gauges (streams in flight, key states) must not linger.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def post_worker_init(worker):  # noqa: ANN001, ANN201 - gunicorn hook
    # Each worker's greenlets, descriptors and RSS as gauges (issue #19), refreshed by a
    # greenlet of its own. Imported here, in the worker, after gevent patched it.
    if _settings.self_stats_s and _settings.metrics_port:
        from shim import selfstats

        selfstats.start(_settings.self_stats_s, lambda: worker.nr)

# One failed-secret table for every worker (issue #14): shared memory mapped
# here, before the fork, so each worker inherits the same pages and an address
# gets max_failures guesses per instance, not per worker. Standard library only.
FailureTable.for_workers()

# CPU is the limit on the target box: one process per core, each multiplexing
# its streams on greenlets.
workers = _settings.workers
# gunicorn's gevent worker plus a prompt graceful stop and JSON framing errors.
worker_class = "shim.worker.ShimWorker"
# Open connections per worker; one long agent stream holds one for minutes.
# Past it a worker stops accepting (the kernel backlog queues the rest), which
# also caps what idle or slow connections can hold.
worker_connections = _settings.worker_connections
# Request line and header limits (gunicorn's defaults, explicit): past them a
# request gets 414/431 in the provider's shape (shim.worker).
limit_request_line = 4094
limit_request_fields = 100
limit_request_field_size = 8190

# Heartbeat, not a request limit: a gevent worker notifies from its own
# greenlet, so a 10-minute stream is fine as long as nothing blocks the loop.
timeout = 30
# On SIGTERM in-flight streams get this long to finish; then they end with the
# provider's error frame. Idle keep-alive connections close at once (shim.worker).
graceful_timeout = int(_settings.graceful_timeout_s + 0.999)
# How long a connection may sit idle, or take to send its request line and
# headers (slow or silent clients); above nginx's upstream keepalive_timeout
# (60 s) so nginx never reuses a connection shim just closed.
keepalive = int(_settings.idle_timeout_s + 0.999)

# Behind nginx: believe X-Forwarded-Proto (and shim believes X-Forwarded-For)
# only from these peers; a header from anyone else is ignored.
forwarded_allow_ips = ",".join(_settings.trusted_proxies)

# gunicorn >= 25.1 opens a control socket under $HOME or $XDG_RUNTIME_DIR; a
# non-root container may have neither writable, and nothing here uses it.
control_socket_disable = True

# gunicorn's own log lines in shim's format on stdout, secrets filtered; its
# access log stays off (its request line would carry a client's ?key=): shim
# writes one access line per request itself.
accesslog = None
logger_class = "shim.logs.GunicornLogger"
errorlog = "-"
loglevel = "info"
# The same list of secrets the app redacts (the Redis password included).
logconfig_dict = gunicorn_logconfig(_settings.log_format, _settings.secrets())
