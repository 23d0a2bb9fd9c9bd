"""``clearrec serve``: the HTTP service (needs the ``service`` extra: fastapi, uvicorn)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..api import open_workdir
from ..errors import ClearrecError
from .common import ConfigOpt, SetOpt, WorkdirOpt, console, workdir_of
from .main import app
from .query import load_for_queries


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
    cfg = load_for_queries(config, workdir, set_)
    serve_cfg = cfg.index.serve
    # opened (and checksum-verified) here, once, so that a bad work directory is a clean error
    rec = open_workdir(workdir_of(cfg, workdir), omp_threads=serve_cfg.omp_threads or None,
                       max_image_pixels=cfg.encode.max_image_pixels)
    application = create_app(recommender=rec, max_body_bytes=serve_cfg.max_body_bytes)
    host, port = host or serve_cfg.host, port or serve_cfg.port
    console.print(f"serving {workdir_of(cfg, workdir)} on http://{host}:{port} (Ctrl-C stops)", markup=False)
    uvicorn.run(application, host=host, port=port, access_log=access_log, log_level="warning")
