"""`grains-edge chat`: the terminal chat; `grains-edge ask`: one answer streamed to stdout."""

from __future__ import annotations

import argparse
import sys

from grains_edge.errors import GrainsError
from grains_edge.options import DEVICES, QUANTIZATIONS, finite_float


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="'default', an export folder, a model folder, .gguf or id")
    parser.add_argument("--profile", default=None, help="behaviour profile: NAME, PATH or none (default: none)")
    parser.add_argument(
        "--alpha", type=finite_float, default=None, help="profile strength (default: the profile's own)"
    )
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument(
        "--quantize",
        default="none",
        choices=QUANTIZATIONS,
        help="weights of the export to run, built on first use (int4: about 2x faster decoding; default none)",
    )
    parser.add_argument("--system", default="", help="system prompt (default: the model's own)")
    parser.add_argument("--max-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1 = off)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.1,
        help="above 1 discourages repeating the context; small models loop without it (default 1.1, 1 = off)",
    )


def register(subparsers) -> None:
    chat = subparsers.add_parser("chat", help="the terminal chat: switch behaviour profiles mid-conversation")
    add_model_arguments(chat)
    chat.add_argument("--resume", action="store_true", help="reopen the latest conversation")
    chat.add_argument("--no-tui", action="store_true", help="answer one prompt on stdout instead")
    chat.add_argument("--prompt", default=None, help="with --no-tui: the prompt (default: read from stdin)")
    chat.set_defaults(run=run, ask=False)
    ask = subparsers.add_parser("ask", help="one answer, streamed to stdout")
    ask.add_argument("prompt", help="the question ('-' reads it from stdin)")
    add_model_arguments(ask)
    ask.set_defaults(run=run, ask=True)


def one_shot_prompt(args: argparse.Namespace) -> str | None:
    """The prompt of a one-shot answer, None for the TUI; checked before the model loads."""
    if not args.ask and not args.no_tui:
        return None
    prompt = args.prompt
    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            raise GrainsError("no prompt given; fix: pass --prompt TEXT or pipe the prompt into stdin")
        try:
            prompt = sys.stdin.read()
        except UnicodeDecodeError as error:
            raise GrainsError(
                f"the prompt on stdin is not UTF-8 text (byte {error.start} is 0x{error.object[error.start]:02x}); "
                "fix: send UTF-8 text"
            ) from None
    try:  # undecodable bytes reach Python as lone surrogates (argv, or stdin in the C locale)
        prompt.encode("utf-8")
    except UnicodeEncodeError as error:
        raise GrainsError(
            f"the prompt is not UTF-8 text (character {error.start + 1}); fix: pass UTF-8 text (check the terminal's "
            "encoding)"
        ) from None
    if not prompt.strip():
        raise GrainsError("the prompt is empty; fix: ask something")
    return prompt


def check(args: argparse.Namespace) -> None:
    if args.alpha is not None and args.profile in (None, "none"):
        raise GrainsError("--alpha sets a profile's strength; fix: add --profile NAME")
    if args.max_tokens < 1:
        raise GrainsError("--max-tokens must be at least 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise GrainsError("--temperature must be ≥ 0 and --top-p in (0, 1]")
    if not 1 <= args.repetition_penalty <= 2:
        raise GrainsError("--repetition-penalty must be in [1, 2] (1 = off)")


def run(args: argparse.Namespace) -> int:
    from grains_edge.runtime.bootstrap import ensure_builtin_profiles, ensure_export
    from grains_edge.runtime.engine import Engine
    from grains_edge.runtime.protocol import GenerationSettings
    from grains_edge.safe_text import printable
    from grains_edge.steer.profiles import steering_for

    check(args)
    prompt = one_shot_prompt(args)
    settings = GenerationSettings(args.max_tokens, args.temperature, args.top_p, args.seed, args.repetition_penalty)
    export_dir = ensure_export(args.model, args.quantize)
    ensure_builtin_profiles(args.model)
    engine = Engine(export_dir, device=args.device)
    if prompt is None:
        from grains_edge.tui.app import run_chat

        return run_chat(engine, args.profile, args.alpha, args.resume, settings=settings, system_prompt=args.system)
    steering, _ = steering_for(engine, args.profile or "none", args.alpha)
    system = [{"role": "system", "content": args.system}] if args.system.strip() else []
    for piece in engine.chat([*system, {"role": "user", "content": prompt}], steering, settings):
        print(printable(piece), end="", flush=True)  # model text never drives the terminal
    print()
    return 0
