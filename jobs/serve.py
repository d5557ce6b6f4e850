"""Serve a trained model over HTTP with Ray Serve: a search page and a JSON API.

    python jobs/serve.py --checkpoint outputs/<run>/best_model.pt
    python jobs/serve.py --checkpoint best_model.pt --port 8080 --split dev
    curl 'http://127.0.0.1:8000/api/search?q=a+red+dog+left+of+a+blue+car&k=5'

Open http://127.0.0.1:8000/ for the page: type a description, see the best-matching
images of the split with their scores. The server binds 127.0.0.1 unless --host says
otherwise, refuses queries longer than --max-query-chars, and stops cleanly on Ctrl-C
or SIGTERM. Without --config, the data settings are the run's own (config.yaml beside
the checkpoint). The split is encoded (and cached) before Ray starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from aoq.cli import config_parser, load_for_checkpoint, run_cli


def main(argv: Sequence[str] | None = None) -> int:
    parser = config_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a best_model.pt")
    parser.add_argument("--split", help="split whose images are searched "
                                        "(default: data.test_split)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--max-query-chars", type=int, default=500,
                        help="longest text query accepted (default 500)")
    args = parser.parse_args(argv)
    cfg = load_for_checkpoint(args, args.checkpoint)

    from aoq.config import ConfigError
    from aoq.data.prepare import prepare_data
    from aoq.inspection.index import open_index

    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: must be 1..65535")
    if args.max_query_chars < 1:
        raise ConfigError(f"--max-query-chars {args.max_query_chars}: must be at least 1")
    data_cfg = dataclasses.replace(cfg.data, test_split=args.split or cfg.data.test_split)
    prepared = prepare_data(data_cfg, progress=True)
    checkpoint = str(Path(args.checkpoint).resolve())
    # Encode (or find cached) before Ray starts: a bad checkpoint fails here, in seconds.
    index = open_index(checkpoint, prepared, data_cfg.test_split, data_cfg.cache_dir,
                       progress=True)

    from aoq.cluster.serve import ServeSpec, serve_until_stopped

    spec = ServeSpec(checkpoint=checkpoint, prepared=prepared, split=data_cfg.test_split,
                     cache_dir=data_cfg.cache_dir, max_query_chars=args.max_query_chars,
                     title=f"aoq: {index.model_name} on {data_cfg.test_split}")
    serve_until_stopped(spec, host=args.host, port=args.port,
                        on_ready=lambda url: print(f"[aoq] serving {index.model_name} at {url} "
                                                   "(Ctrl-C or SIGTERM stops it)", flush=True))
    print("[aoq] stopped", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
