"""`mipadapter web`: the Gradio demo page, models loaded once, bound to 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import argparse

from mipadapter.cli.options import add_model_flags, add_tiny_argument
from mipadapter.config import DEFAULT_PRESET, PRESETS
from mipadapter.limits import Limits


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "web",
        help="serve a web page for multi-subject generation (needs the [web] extra)",
        description="Serve the demo page: subjects with photos, a prompt, images and routing maps.",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (0.0.0.0 exposes it to the network; then any Host name is answered, not only "
        "localhost's) (default: %(default)s, this machine only)",
    )
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name the server answers to besides localhost (repeatable), e.g. behind a reverse proxy "
        "that passes the browser's Host on (default: none)",
    )
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default: %(default)s)")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=DEFAULT_PRESET,
        help="the default models and scale (default: %(default)s)",
    )
    add_model_flags(parser)
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1 … (default: %(default)s)",
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "float16", "bfloat16"],
        default="auto",
        help="weights' dtype (default: %(default)s = float16 on GPUs, float32 on the CPU)",
    )
    parser.add_argument(
        "--max-subjects", type=int, default=4, help="subjects one request may give (default: %(default)s)"
    )
    parser.add_argument(
        "--max-upload-mb", type=float, default=10.0, help="largest photo file accepted (default: %(default)s)"
    )
    parser.add_argument(
        "--queue-size", type=int, default=16, help="requests that may wait for the model (default: %(default)s)"
    )
    parser.add_argument(
        "--max-session-uploads",
        type=int,
        default=Limits.max_session_uploads,
        help="photos one browser session may upload per hour (default: %(default)s)",
    )
    parser.add_argument(
        "--max-session-upload-mb",
        type=float,
        default=Limits.max_session_upload_bytes / 2**20,
        help="megabytes one browser session may upload per hour (default: %(default)g)",
    )
    add_tiny_argument(parser, "try the page anywhere")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile the UNet (torch.compile): the first generation pays minutes of compilation, later ones "
        "with the same size, number of subjects and rule reuse it; routing maps are then not drawn "
        "(default: off)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.max_subjects < 1 or args.max_upload_mb <= 0 or args.queue_size < 1:
        raise ValueError("--max-subjects and --queue-size must be ≥ 1 and --max-upload-mb > 0")
    for name in args.allow_host:
        if not name or any(char in name for char in "/:@ "):
            raise ValueError(f"--allow-host takes a host name without scheme or port, got {name!r}")
    if args.max_session_uploads < 1:
        raise ValueError(f"--max-session-uploads must be ≥ 1, got {args.max_session_uploads}")
    if not args.max_session_upload_mb >= args.max_upload_mb:  # also refuses NaN
        raise ValueError(
            f"--max-session-upload-mb must be at least --max-upload-mb ({args.max_upload_mb:g}), "
            f"got {args.max_session_upload_mb:g}"
        )
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must lie in 0..65535, got {args.port}")
    try:
        from mipadapter.web.app import build_app, launch
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] == "gradio":
            raise RuntimeError("the web demo needs gradio: pip install 'mipadapter[web]'") from None
        raise
    from mipadapter.cli.options import load_pipeline, pick_device_dtype
    device, dtype = pick_device_dtype(args.device, args.dtype, tiny=args.tiny)
    pipe, models = load_pipeline(args, device, dtype)  # once, for every request
    if args.compile:
        pipe.compile()
    upload_bytes = int(args.max_upload_mb * 2**20)
    session_bytes = int(args.max_session_upload_mb * 2**20)
    limits = Limits.for_pipeline(
        pipe,
        max_subjects=args.max_subjects,
        max_upload_bytes=upload_bytes,
        max_session_uploads=args.max_session_uploads,
        max_session_upload_bytes=session_bytes,
        max_server_upload_bytes=max(Limits.max_server_upload_bytes, session_bytes),
    )
    app = build_app(
        pipe,
        limits,
        models,  # a ModelRecord: what every downloaded image's recipe records
        default_steps=4 if args.tiny else 30,
        compiled=args.compile,
    )
    launch(
        app,
        host=args.host,
        port=args.port,
        max_file_size=upload_bytes,
        queue_size=args.queue_size,
        limits=limits,
        allowed_hosts=tuple(args.allow_host),
    )
    return 0
