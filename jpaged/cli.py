"""`jpaged` command line: flag parsing only; each subcommand is one call into the package.

User mistakes (bad paths, unsupported models, corrupt files, empty prompts) end as one line on stderr
and exit status 1 (2 for bad flags), never a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from typing import Sequence

from jpaged.config import DTYPES, EngineConfig

# What `jpaged serve` imports beyond the engine (pyproject's base dependencies; `jpaged[serve]` names them too).
SERVER_MODULES = ("fastapi", "uvicorn", "pydantic", "prometheus_client")
SCALARS = {"int": int, "float": float, "str": str}  # EngineConfig field types -> argparse types
SEPARATOR = "---"  # the line between the completions of several prompts (one prompt: the completion alone)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # argparse prints the whole usage first; one line is what the user needs.
        self.exit(2, f"{self.prog}: error: {message}\n")


def _log(message: str) -> None:
    print(f"jpaged: {message}", file=sys.stderr, flush=True)


def _join_distributed(args: argparse.Namespace) -> None:
    """A multi-host run (flags or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID): join it."""
    from jpaged.sharding import initialize_distributed

    initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)


def _generate(args: argparse.Namespace) -> None:
    from jpaged.engine import multihost
    from jpaged.llm import LLM
    from jpaged.loader import load_model
    from jpaged.sampling_params import SamplingParams

    if not all(p.strip() for p in args.prompt):
        raise ValueError("PROMPT must be non-empty text")
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.sampling_seed)
    _join_distributed(args)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    if tokenizer is None:
        raise ValueError("this model has no tokenizer (an HF dir needs tokenizer.json)")
    llm = LLM(model_obj=model, tokenizer=tokenizer, **_engine_args(args))
    prompts = [llm.chat_prompt_ids([{"role": "user", "content": p}]) if args.chat else p for p in args.prompt]

    def print_completions():
        outputs = llm.generate(prompts, params, use_tqdm=not args.no_progress and sys.stderr.isatty())
        for i, out in enumerate(outputs):
            if i:
                print(SEPARATOR)
            print(out.outputs[0].text, flush=True)

    multihost.lead_or_follow(llm.engine, print_completions)  # other processes of a multi-host run follow


def _serve(args: argparse.Namespace) -> None:
    from jpaged.server import serve
    from jpaged.server.cli_args import server_settings

    settings = server_settings(args)  # a bad flag fails before the distributed join and the model load
    _join_distributed(args)
    serve(EngineConfig(**_engine_args(args)), settings, log_level=args.log_level)


def _missing_server_module() -> str | None:
    return next((m for m in SERVER_MODULES if importlib.util.find_spec(m) is None), None)


def _engine_args(args: argparse.Namespace) -> dict:
    """The EngineConfig fields the flags set."""
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    return {k: v for k, v in vars(args).items() if k in names}


def add_engine_flags(p: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    """One flag per EngineConfig field (--max-num-seqs for max_num_seqs; a field that defaults to
    True gets --no-NAME, without its `enable_`), with the field's default and its metadata's help."""
    for f in dataclasses.fields(EngineConfig):
        if f.name in skip:
            continue
        help_text = f.metadata.get("help", "")
        if isinstance(f.default, bool):
            name = f.name.removeprefix("enable_").replace("_", "-")
            flag, action = (f"--no-{name}", "store_false") if f.default else (f"--{name}", "store_true")
            p.add_argument(flag, *f.metadata.get("aliases", ()), dest=f.name, action=action,
                           help=f"do not {help_text}" if f.default else help_text)
            continue
        nargs = f.metadata.get("nargs")
        kind = str if nargs else SCALARS[str(f.type).split(" |")[0]]
        default = f" (default: {f.default})" if f.default is not None and f.default != () else ""
        p.add_argument("--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ()), dest=f.name, type=kind, default=f.default,
                       choices=f.metadata.get("choices"), nargs=nargs, help=help_text + default)


def _add_distributed_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator-address", default=None, help="multi-host: HOST:PORT of process 0 "
                   "(default $JAX_COORDINATOR_ADDRESS; none: one process)")
    p.add_argument("--num-processes", type=int, default=None, help="multi-host: processes in the job "
                   "(default $JAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, default=None, help="multi-host: this process, 0 serves "
                   "(default $JAX_PROCESS_ID)")


def _convert(args: argparse.Namespace) -> None:
    from jpaged.loader import load_model
    from jpaged.loader.orbax_ckpt import save_checkpoint

    model, tokenizer = load_model(args.src, dtype=args.dtype)
    _log(f"saved {save_checkpoint(model, tokenizer, args.dst)}")


def _cache_map(args: argparse.Namespace) -> None:
    import json
    import urllib.error
    import urllib.request

    from jpaged.engine.cache_map import render_png

    request = urllib.request.Request(args.url.rstrip("/") + "/debug/kv-cache?format=json")
    if args.api_key:
        request.add_header("Authorization", f"Bearer {args.api_key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            data = json.loads(response.read())
    except urllib.error.URLError as e:
        raise OSError(f"--url {args.url}: {getattr(e, 'reason', e)}") from None
    if args.format == "json":
        text = json.dumps(data, indent=1)
        if args.out in (None, "-"):
            print(text)
        else:
            open(args.out, "w").write(text + "\n")
        return
    out = args.out or "kv_cache_map.png"
    with open(out, "wb") as f:
        f.write(render_png(data, title=args.url))
    _log(f"wrote {out}: device {data['device']['counts']}, host {data['host']['counts']}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jpaged", description="LLM inference in JAX with paged attention.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    gen = sub.add_parser("generate", help="complete prompts; prints only the completions on stdout")
    gen.add_argument("prompt", nargs="+", metavar="PROMPT",
                     help=f"text to complete (one completion per PROMPT; a line {SEPARATOR!r} between them)")
    gen.add_argument("--max-tokens", type=int, default=64, help="most new tokens per prompt (default 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    gen.add_argument("--seed", dest="sampling_seed", metavar="SEED", type=int, default=0,
                     help="sampling seed (default 0)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar (there is one only when "
                     "stderr is a terminal)")
    add_engine_flags(gen, skip=("seed",))
    _add_distributed_flags(gen)
    gen.set_defaults(run=_generate)

    srv = sub.add_parser("serve", help="serve the OpenAI API (completions, chat, models, health, metrics)")
    if _missing_server_module() is None:
        from jpaged.server.cli_args import add_server_args
        add_server_args(srv)
    add_engine_flags(srv)
    _add_distributed_flags(srv)
    srv.set_defaults(run=_serve)

    conv = sub.add_parser("convert", help="convert a model (HF dir, .gguf, default) to a fast-loading checkpoint")
    conv.add_argument("src", metavar="SRC", help="model to convert: 'default', an HF dir or a .gguf file")
    conv.add_argument("dst", metavar="DST", help="new directory to write the checkpoint to")
    conv.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype to store (default float32)")
    conv.set_defaults(run=_convert)

    cmap = sub.add_parser("cache-map", help="the KV cache map of a running server (every page's state) "
                          "as a PNG block map or JSON")
    cmap.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    cmap.add_argument("--api-key", default=None, help="the server's API key, if it has one")
    cmap.add_argument("--format", choices=("png", "json"), default="png", help="png (default) or json")
    cmap.add_argument("--out", default=None, help="file to write (default kv_cache_map.png; json: stdout)")
    cmap.set_defaults(run=_cache_map)

    from jpaged.bench_cli import BENCHMARKS
    sub.add_parser("bench", help=f"run a benchmark from bench/ ({', '.join(BENCHMARKS)}); "
                   "jpaged bench --help lists them", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from jpaged.bench_cli import main as bench_main
        return bench_main(argv[1:])
    if argv[:1] == ["serve"] and (missing := _missing_server_module()) is not None:
        print(f"jpaged serve: error: the server needs the {missing} package; pip install 'jpaged[serve]'",
              file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError) as e:
        message = " ".join(str(e).split())  # one line, whatever the exception text held
        print(f"jpaged {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
