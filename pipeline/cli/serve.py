"""``clearrec serve``: the HTTP service (needs the ``service`` extra: fastapi, uvicorn).

Start-up: the work directory is opened (and checksum-verified) first, so that a bad one is a clean
error; the server then binds and says "serving ... on" once it answers. The query encoders (text /
image search) load after that, in the background: /health, /recommend and /similar answer at once,
and a search that arrives before its encoder is loaded waits for it. The text encoder runs in
child processes (``index.serve.text_encoder_processes``), so that its forward passes do not wait for
the server's GIL and batches of concurrent queries run at the same time.
"""

from __future__ import annotations

import threading
import time
from typing import Annotated, Any, Optional

import typer

from ..errors import ArtifactError, ClearrecError, EncoderUnavailableError
from .common import ConfigOpt, SetOpt, WorkdirOpt, console, workdir_of
from .main import app
from .query import load_for_queries


def warm_up_in_background(rec: Any) -> threading.Thread:
    """Load ``rec``'s query encoders in a daemon thread; prints when they are ready (or why not)."""

    def work() -> None:
        from .._serving import freeze_heap

        t0 = time.perf_counter()
        try:
            rec.warm_up()
        except (EncoderUnavailableError, ArtifactError) as e:  # the searches that need it answer 503 with this
            console.print(f"[yellow]warning:[/] query encoder not loaded: {e}")
            return
        finally:
            freeze_heap()  # what is loaded by now stays out of every later full collection
        console.print(f"query encoders ready in {time.perf_counter() - t0:.1f}s", highlight=False)

    thread = threading.Thread(target=work, name="clearrec-warm-up", daemon=True)
    thread.start()
    return thread


@app.command()
def serve(
    config: ConfigOpt = None,
    workdir: WorkdirOpt = None,
    set_: SetOpt = None,
    host: Annotated[Optional[str], typer.Option("--host", help="Bind address. Default: index.serve.host.",
                                                show_default=False)] = None,
    port: Annotated[Optional[int], typer.Option("--port", help="TCP port. Default: index.serve.port.",
                                                show_default=False)] = None,
    access_log: Annotated[bool, typer.Option("--access-log", help="Log every request.")] = False,
) -> None:
    """Serve /recommend, /similar, /search and /health over HTTP from a built index."""
    try:
        import uvicorn

        from ..service import create_app
    except ImportError as e:
        raise ClearrecError(f"clearrec serve needs the service extra ({e}); install it with: "
                          "pip install 'clearrec[service]'") from e
    from ..api import open_workdir

    cfg = load_for_queries(config, workdir, set_)
    serve_cfg = cfg.index.serve
    root = workdir_of(cfg, workdir, must_exist=True)
    rec = open_workdir(root, omp_threads=serve_cfg.omp_threads or None, max_image_pixels=cfg.encode.max_image_pixels,
                       text_encoder_processes=serve_cfg.text_encoder_processes)
    application = create_app(recommender=rec, max_body_bytes=serve_cfg.max_body_bytes, warm_up=False)
    host, port = host or serve_cfg.host, port or serve_cfg.port

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:  # bound and accepting: say so now, not before
                console.print(f"serving {root} on http://{host}:{port} (Ctrl-C stops)", highlight=False, markup=False)
                warm_up_in_background(rec)

    try:
        Server(uvicorn.Config(application, host=host, port=port, access_log=access_log, log_level="warning")).run()
    finally:
        rec.close()
