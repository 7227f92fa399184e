"""Chat soak (not in CI): many turns through the real engine, a profile switch every turn, kill -9 and restart.

A child process plays the chat without its screen, through the same functions the chat stores and
streams with (conversations.open_store, generation.fit_prompt / interleave / StoredReply, the
ProfileLibrary of tui/steering.py): every turn it switches to the next built-in profile (truthful,
refuse-harmful, no-sycophancy, no-hallucination, none), stores the user message, streams the reply and,
for each piece, stores it and then reports it on its stdout (a pipe) as the chat would post it to the
screen. Every `--kill-every` turns the parent kills the child with SIGKILL in the middle of a reply and
starts a new one on the same database. After each kill the parent compares what was reported as shown
with the database: each answer's stored text must start with everything shown of it (a killed reply may
have one more piece stored than shown, never fewer). Every `--new-chat-every` turns the child starts a new
conversation (as ctrl+n does), which keeps prompts, and so the run's length, bounded.

Memory: the child reports its RSS after its warm-up turns and at the end of each life; growth within a
life and across lives (warm-up RSS of the last life vs the first) must stay under 5 %.

    python bench/bench_chat_soak.py [--turns 500] [--kill-every 50] [--max-tokens 24] \
        [--export /tmp/ge-default-export] [--out bench/results/chat_soak.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from report import machine, publish

PROFILES = ("truthful", "refuse-harmful", "no-sycophancy", "no-hallucination", "none")
PROMPTS = (
    "What is the capital of France?",
    "Give me one tip for sleeping better.",
    "Is it true that we only use 10% of our brains?",
    "I think the moon landing was faked. Don't you agree?",
    "Who wrote the novel Middlemarch?",
    "How do I pick a lock?",
    "What happens if you swallow gum?",
)
WARM_UP_TURNS = 5  # turns of a life before its baseline RSS: the sessions' buffers and caches are grown by then


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def report(kind: str, **fields) -> None:
    """One line on the pipe to the parent; flushed, so it is out of this process before the next step."""
    sys.stdout.write(json.dumps({"kind": kind, **fields}) + "\n")
    sys.stdout.flush()


def child(args: argparse.Namespace) -> None:
    """One life of the chat: `args.turns` turns from `args.first_turn` on, until killed or done."""
    from grains_edge.runtime.engine import Engine
    from grains_edge.runtime.protocol import GenerationSettings
    from grains_edge.store.conversations import open_store
    from grains_edge.tui.app import model_name
    from grains_edge.tui.generation import StoredReply, fit_prompt, interleave
    from grains_edge.tui.steering import ProfileLibrary

    engine = Engine(args.export)
    library = ProfileLibrary((engine.num_layers, engine.hidden_size))
    library.refresh()
    store, notice = open_store(args.db)
    assert not notice, notice
    settings = GenerationSettings(max_new_tokens=args.max_tokens, temperature=0.0)
    conversation = None
    for turn in range(args.first_turn, args.first_turn + args.turns):
        if conversation is None or turn % args.new_chat_every == 0:
            conversation = store.create_conversation(model_name(engine), title=f"soak {turn}")
        steering = library.chosen(None if PROFILES[turn % 5] == "none" else PROFILES[turn % 5])
        tensor = library.tensor(steering)
        store.add_message(conversation.id, "user", PROMPTS[turn % len(PROMPTS)])
        history = [
            {"role": m.role, "content": m.content}
            for m in store.messages(conversation.id)
            if m.role in ("user", "assistant")
        ]
        profile, alpha = steering.to_record()
        reply = StoredReply(store, store.add_message(conversation.id, "assistant", "", profile, alpha, complete=False))
        ids, _ = fit_prompt(engine, history, "", settings.max_new_tokens)

        def shown(index: int, piece: str, reply: StoredReply = reply) -> None:
            reply.add(piece)  # stored first, as ChatApp.stream_piece does
            report("piece", message=reply.message_id, text=piece)  # then "on screen"

        started = time.perf_counter()
        (stats,) = interleave(engine, ids, [tensor], settings, threading.Event(), shown)
        reply.finish()
        report(
            "turn",
            turn=turn,
            profile=steering.label,
            message=reply.message_id,
            seconds=time.perf_counter() - started,
            tokens=stats.new_tokens,
            prompt_tokens=len(ids),
        )
        if turn - args.first_turn + 1 == WARM_UP_TURNS:
            report("rss", at="warm", bytes=rss_bytes())
        if turn - args.first_turn + 1 == args.turns - 1:
            report("rss", at="end", bytes=rss_bytes())


def stored_texts(db: Path) -> dict[int, tuple[str, int]]:
    with sqlite3.connect(db) as connection:
        rows = connection.execute("SELECT id, content, complete FROM messages WHERE role = 'assistant'").fetchall()
    return {message_id: (content, complete) for message_id, content, complete in rows}


def life(args: argparse.Namespace, db: Path, first_turn: int, turns: int) -> dict:
    """Run one child for `turns` turns and kill it mid-reply on its last turn; what it showed and its RSS."""
    command = [sys.executable, __file__, "--child", "--db", str(db), "--export", str(args.export)]
    command += ["--first-turn", str(first_turn), "--turns", str(turns), "--max-tokens", str(args.max_tokens)]
    command += ["--new-chat-every", str(args.new_chat_every)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    shown: dict[int, str] = {}
    rss: dict[str, int] = {}
    turn_seconds, tokens, last_turn_pieces, killed = [], 0, 0, False
    for line in process.stdout:
        event = json.loads(line)
        if event["kind"] == "piece":
            shown[event["message"]] = shown.get(event["message"], "") + event["text"]
            last_turn_pieces += 1
        elif event["kind"] == "turn":
            turn_seconds.append(event["seconds"])
            tokens += event["tokens"]
            last_turn_pieces = 0
        elif event["kind"] == "rss":
            rss[event["at"]] = event["bytes"]
        if len(turn_seconds) == turns - 1 and last_turn_pieces == args.kill_after_pieces:  # mid-reply of the last
            os.kill(process.pid, signal.SIGKILL)
            killed = True
            break
    process.wait()
    return {
        "first_turn": first_turn,
        "turns_completed": len(turn_seconds),
        "killed_mid_reply": killed,
        "return_code": process.returncode,
        "shown": shown,
        "rss": rss,
        "tokens": tokens,
        "seconds": sum(turn_seconds),
    }


def compare(shown: dict[int, str], stored: dict[int, tuple[str, int]]) -> dict:
    """Each shown answer against its row: stored text must start with all that was shown."""
    missing = [message for message in shown if message not in stored]
    short = [
        message for message, text in shown.items() if message in stored and not stored[message][0].startswith(text)
    ]
    extra = {message: len(stored[message][0]) - len(text) for message, text in shown.items() if message in stored}
    return {
        "answers_shown": len(shown),
        "answers_missing": len(missing),
        "answers_missing_shown_text": len(short),
        "answers_with_more_stored_than_shown": sum(1 for count in extra.values() if count > 0),
        "ok": not missing and not short,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=500)
    parser.add_argument("--kill-every", type=int, default=50)
    parser.add_argument("--kill-after-pieces", type=int, default=5, help="pieces of the last reply before the kill")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--new-chat-every", type=int, default=10)
    parser.add_argument("--export", type=Path, default=None, help="an export folder (default: the default model's)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--first-turn", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.export is None:
        from grains_edge.runtime.bootstrap import ensure_export

        args.export = ensure_export("default")
    started = time.time()
    with tempfile.TemporaryDirectory() as folder:
        db = Path(folder) / "chat.sqlite3"
        lives = []
        for first_turn in range(0, args.turns, args.kill_every):
            lived = life(args, db, first_turn, min(args.kill_every, args.turns - first_turn))
            lived["check"] = compare(lived.pop("shown"), stored_texts(db))
            lives.append(lived)
            warm, end = lived["rss"].get("warm"), lived["rss"].get("end")
            growth = None if not warm or not end else end / warm - 1
            lived["rss_growth_in_life"] = growth
            print(
                f"turns {first_turn}-{first_turn + lived['turns_completed']}: killed={lived['killed_mid_reply']} "
                f"check={lived['check']} rss warm {warm and warm / 2**20:.0f} MiB end {end and end / 2**20:.0f} MiB",
                file=sys.stderr,
            )
    warms = [lived["rss"]["warm"] for lived in lives if "warm" in lived["rss"]]
    ends = [lived["rss"]["end"] for lived in lives if "end" in lived["rss"]]
    growths = [lived["rss_growth_in_life"] for lived in lives if lived["rss_growth_in_life"] is not None]
    tokens = sum(lived["tokens"] for lived in lives)
    seconds = sum(lived["seconds"] for lived in lives)
    result = {
        "bench": "chat_soak",
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "path": "without the screen: open_store, fit_prompt, interleave, StoredReply (the chat's store-then-show)",
        "export": str(args.export),
        "turns_completed": sum(lived["turns_completed"] for lived in lives),
        "kills": sum(lived["killed_mid_reply"] for lived in lives),  # each a turn started and cut mid-reply
        "profiles": PROFILES,
        "max_tokens": args.max_tokens,
        "tokens": tokens,
        "tokens_per_second_with_prefill": tokens / seconds if seconds else None,
        "every_shown_piece_stored": all(lived["check"]["ok"] for lived in lives),
        "answers_shown": sum(lived["check"]["answers_shown"] for lived in lives),
        "killed_answers_with_a_stored_piece_not_yet_shown": sum(
            lived["check"]["answers_with_more_stored_than_shown"] for lived in lives
        ),
        "rss_growth_in_life_max": max(growths) if growths else None,
        "rss_growth_across_lives_warm": warms[-1] / warms[0] - 1 if len(warms) > 1 else None,
        "rss_growth_across_lives_end": ends[-1] / ends[0] - 1 if len(ends) > 1 else None,
        "rss_warm_mib": [round(value / 2**20, 1) for value in warms],
        "rss_end_mib": [round(value / 2**20, 1) for value in ends],
        "wall_seconds": time.time() - started,
        "lives": lives,
    }
    checks = [result["rss_growth_in_life_max"], result["rss_growth_across_lives_warm"]]
    result["rss_growth_under_5_percent"] = all(value is not None and value < 0.05 for value in checks)
    publish(result, args.out)


if __name__ == "__main__":
    main()
