"""`jpaged` command line: flag parsing only; each subcommand is one call into the package.

User mistakes (bad paths, unsupported models, corrupt files, empty prompts) end as one line on stderr
and exit status 1 (2 for bad flags), never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

DTYPES = ("float32", "bfloat16")


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
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    _join_distributed(args)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    if tokenizer is None:
        raise ValueError("this model has no tokenizer (an HF dir needs tokenizer.json)")
    llm = LLM(args.model, model_obj=model, tokenizer=tokenizer, dtype=args.dtype,
              max_model_len=args.max_model_len, tensor_parallel_size=args.tensor_parallel_size,
              data_parallel_size=args.data_parallel_size)
    prompts = [llm.chat_prompt_ids([{"role": "user", "content": p}]) if args.chat else p for p in args.prompt]

    def print_completions():
        for out in llm.generate(prompts, params, use_tqdm=sys.stderr.isatty()):
            print(out.outputs[0].text, flush=True)

    multihost.lead_or_follow(llm.engine, print_completions)  # other processes of a multi-host run follow


def _serve(args: argparse.Namespace) -> None:
    from jpaged.server import serve
    from jpaged.server.cli_args import server_settings

    settings = server_settings(args)  # a bad flag fails before the distributed join and the model load
    _join_distributed(args)
    serve(args, settings, log_level=args.log_level)


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    """EngineConfig fields as flags (names match, so the server's engine_config picks them up)."""
    from jpaged.config import EngineConfig

    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="parameter dtype (default bfloat16)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV page")
    p.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one step")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    p.add_argument("--max-num-prefill-seqs", type=int, default=EngineConfig.max_num_prefill_seqs,
                   help="most sequences with more than one new token (prefill chunks) in one step; sizes the "
                   "Mosaic prefill kernel's work list")
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + completion")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV pages in the pool (default: sized "
                   "from free device memory)")
    p.add_argument("--num-host-kv-blocks", type=int, default=0, help="host pages for swap preemption")
    p.add_argument("--preemption-mode", choices=("recompute", "swap"), default="recompute")
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false")
    p.add_argument("--no-chunked-prefill", dest="enable_chunked_prefill", action="store_false")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--data-parallel-size", type=int, default=1)
    p.add_argument("--backend", "--attn-impl", dest="backend", default="auto", help="kernels: 'auto' (Hopper: mosaic; other GPUs: pallas; CPU: reference), a preset ('reference', 'pallas', 'mosaic', 'interpret'), optionally with field=value overrides, e.g. 'mosaic,decode=mosaic' (pallas_kernels/backend.py)")
    p.add_argument("--seed", type=int, default=0, help="engine seed for unseeded requests")


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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jpaged", description="LLM inference in JAX with paged attention.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="complete prompts; prints only the completions on stdout")
    gen.add_argument("prompt", nargs="+", metavar="PROMPT", help="text to complete (one completion per PROMPT)")
    gen.add_argument("--model", default="default",
                     help="'default' (SmolLM2-135M-Instruct), an HF dir, a .gguf file, a converted dir or a preset")
    gen.add_argument("--max-tokens", type=int, default=64, help="most new tokens per prompt (default 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    gen.add_argument("--dtype", choices=DTYPES, default="float32", help="parameter dtype (default float32)")
    gen.add_argument("--max-model-len", type=int, default=4096, help="longest prompt + completion (default 4096)")
    gen.add_argument("--tensor-parallel-size", type=int, default=1, help="devices to shard the model over")
    gen.add_argument("--data-parallel-size", type=int, default=1,
                     help="model replicas, each on --tensor-parallel-size devices of its own; prompts spread over them")
    _add_distributed_flags(gen)
    gen.set_defaults(run=_generate)

    srv = sub.add_parser("serve", help="serve the OpenAI API (completions, chat, models, health, metrics)")
    srv.add_argument("--model", default="default", help="as for generate")
    from jpaged.server.cli_args import add_server_args

    add_server_args(srv)
    _add_engine_flags(srv)
    _add_distributed_flags(srv)
    srv.set_defaults(run=_serve)

    conv = sub.add_parser("convert", help="convert a model (HF dir, .gguf, default) to a fast-loading checkpoint")
    conv.add_argument("src", metavar="SRC", help="model to convert: 'default', an HF dir or a .gguf file")
    conv.add_argument("dst", metavar="DST", help="new directory to write the checkpoint to")
    conv.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype to store (default float32)")
    conv.set_defaults(run=_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from jpaged.bench_cli import main as bench_main
        return bench_main(argv[1:])
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
