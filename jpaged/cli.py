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


def _generate(args: argparse.Namespace) -> None:
    from jpaged.loader import load_model
    from jpaged.simple_generate import generate_texts

    if not all(p.strip() for p in args.prompt):
        raise ValueError("PROMPT must be non-empty text")
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    for text in generate_texts(model, tokenizer, args.prompt, chat=args.chat, max_tokens=args.max_tokens,
                               temperature=args.temperature, seed=args.seed, log=_log):
        print(text, flush=True)


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
    gen.set_defaults(run=_generate)

    conv = sub.add_parser("convert", help="convert a model (HF dir, .gguf, default) to a fast-loading checkpoint")
    conv.add_argument("src", metavar="SRC", help="model to convert: 'default', an HF dir or a .gguf file")
    conv.add_argument("dst", metavar="DST", help="new directory to write the checkpoint to")
    conv.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype to store (default float32)")
    conv.set_defaults(run=_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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
