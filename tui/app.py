"""`grains-edge chat`: a terminal chat whose behaviour profile can change between any two replies.

Built like Textual's examples/mother.py: each reply streams from a thread worker into Markdown widgets,
and the conversation view is anchored to the newest text. The worker posts its pieces as messages
(thread-safe, and it never waits for the screen), so generation runs at the engine's speed while the
Markdown stream coalesces whatever arrives between two frames. Each piece is committed to the history
before it is posted, so what the screen shows is on disk; and it is shown through `printable`, so model
text never reaches the terminal as control characters. Switching a profile only builds a new steering
tensor for the engine's next call; the model is never reloaded.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header, Markdown, OptionList, Switch
from textual.widgets.markdown import MarkdownStream
from textual.worker import Worker

from grains_edge import paths
from grains_edge.errors import GrainsError
from grains_edge.model.sources import DEFAULT_GGUF, DEFAULT_MODEL
from grains_edge.runtime.protocol import ChatEngine, GenerationSettings, GenerationStats
from grains_edge.safe_text import printable
from grains_edge.steer.profiles import OnceWarnings
from grains_edge.store import conversations
from grains_edge.store.conversations import Conversation, ConversationStore, open_store
from grains_edge.tui.generation import StoredReply, fit_prompt, interleave
from grains_edge.tui.screens import HelpScreen, HistoryScreen, MixScreen, SettingsScreen, SystemPromptScreen
from grains_edge.tui.steering import ProfileLibrary, Steering, alpha_step
from grains_edge.tui.widgets import (
    Answer,
    AnswerPair,
    Composer,
    ProfileList,
    ProfilePanel,
    StatusBar,
    UserMessage,
    Welcome,
)

ALPHA = Binding.Group("α strength", compact=True)
EXTRA_KEYS = [
    ("enter", "Send the message"),
    ("ctrl+j / shift+enter", "New line in the message"),
    ("tab / shift+tab", "Between the message box and the profile list"),
    ("enter (profiles)", "Apply the highlighted profile to the next reply"),
    ("+ / - (profiles)", "Strength α of the active profile"),
    ("m (profiles)", "Mix the highlighted profile into the active one (again: remove it)"),
    ("c (profiles)", "Compare against the highlighted profile (left column)"),
    ("ctrl+p", "Command palette: every action, every profile"),
    ("ctrl+q", "Quit"),
]


@dataclass
class Lane:
    """One answer of a turn: its steering tensor, the widget showing it and the row storing it."""

    tensor: np.ndarray | None
    widget: Answer
    reply: StoredReply
    stream: MarkdownStream | None = None


@dataclass
class Turn:
    """A reply in progress: one lane, or two in compare mode (baseline left, active steering right)."""

    lanes: list[Lane]
    user: tuple[int, UserMessage] | None  # the message just sent (taken back if it can't be answered)
    stop: threading.Event = field(default_factory=threading.Event)
    stats: list[GenerationStats] = field(default_factory=list)
    prompt_tokens: int = 0
    error: str = ""
    worker: Worker | None = None


class Piece(Message):
    """A piece of an answer, posted by the generation worker."""

    def __init__(self, lane: Lane, text: str):
        super().__init__()
        self.lane = lane
        self.text = text


class TurnEnded(Message):
    """The worker is done with a turn (its answers are saved)."""

    def __init__(self, turn: Turn):
        super().__init__()
        self.turn = turn


def model_name(engine: ChatEngine) -> str:
    manifest = engine.manifest
    source = manifest.source_model
    name = DEFAULT_GGUF.split(".")[0] if source == DEFAULT_MODEL else Path(source).name or source
    return name if manifest.quantization == "none" else f"{name} {manifest.quantization}"


def key_name(key: str) -> str:
    return key.replace("up", "↑").replace("down", "↓")


def reply_note(stats: GenerationStats) -> str:
    note = f"{stats.new_tokens} tokens · {stats.tokens_per_second:.1f} tok/s"
    return note + {"user": " · stopped", "length": " · max tokens"}.get(stats.stopped_by, "")


class ChatApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "grains-edge"
    HORIZONTAL_BREAKPOINTS = [(0, "-tiny"), (64, "-narrow"), (100, "-wide")]
    BINDINGS = [
        Binding("f1", "help", "Help", tooltip="This list of keys"),
        Binding("escape", "stop", "Stop", tooltip="Stop the reply"),
        Binding("ctrl+r", "regenerate", "Regenerate", tooltip="Answer the last message again (current profile)"),
        Binding("ctrl+t", "toggle_compare", "Compare", tooltip="Answer side by side: left column vs active profile"),
        Binding("ctrl+up", "alpha(1)", "α+", group=ALPHA, tooltip="Stronger steering"),
        Binding("ctrl+down", "alpha(-1)", "α−", group=ALPHA, tooltip="Weaker steering (below 0: the opposite)"),
        Binding("ctrl+b", "toggle_panel", "Profiles", tooltip="Show or hide the steering panel"),
        Binding("ctrl+o", "history", "History", tooltip="Reopen a past conversation"),
        Binding("ctrl+n", "new_chat", "New", tooltip="Clear: a new conversation (the old one stays in History)"),
        Binding("ctrl+s", "settings", "Settings", tooltip="Temperature, top-p, max tokens, seed"),
        Binding("f2", "system_prompt", "System prompt", tooltip="Edit the system prompt"),
        Binding("ctrl+y", "copy_answer", "Copy answer", show=False, priority=True, tooltip="Copy the last answer"),
    ]

    def __init__(
        self,
        engine: ChatEngine,
        store: ConversationStore,
        library: ProfileLibrary,
        steering: Steering | None = None,
        resume: bool = False,
        settings: GenerationSettings | None = None,
        system_prompt: str = "",
        notice: str = "",
    ):
        super().__init__()
        self.warn_once = OnceWarnings(  # a profile's warning (other weights, α far outside its tuning), once
            lambda message: self.notify(message, title="Profile", severity="warning", timeout=10)
        )
        self.engine = engine
        self.store = store
        self.library = library
        self.steering = steering or Steering()
        self.baseline = Steering()  # the left column in compare mode
        self.compare = False
        self.resume = resume
        self.settings = settings or GenerationSettings()
        self.conversation: Conversation | None = None
        self.system_prompt = system_prompt  # for new conversations; an opened one brings its own
        self.turn: Turn | None = None
        self.speed: float | None = None  # tokens/s of the last reply
        self.context_used: int | None = None
        self.notice = notice  # why the history in use is not the usual file, or is read-only

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="body"):
            with Vertical(id="conversation"):
                with VerticalScroll(id="chat"):
                    yield Welcome()
                yield Composer()
            yield ProfilePanel(id="panel")
        yield StatusBar(id="status")
        yield Footer()

    async def on_mount(self) -> None:
        self.library.warn = self.warn_once
        self.chat.anchor()
        self.refresh_panel()
        self.refresh_status()
        if self.notice:
            self.notify(self.notice, title="Chat history", severity="warning", timeout=15)
        if self.resume:
            try:
                latest = self.store.latest()
            except GrainsError as error:
                self.history_failed(error)
            else:
                if latest is not None:
                    await self.open_conversation(latest.id)
        self.query_one(Composer).focus()

    def notify(self, message: str, **options) -> None:
        """Every notification as plain text: messages quote model output, file names and profile metadata."""
        options["markup"] = False
        super().notify(printable(message), **options)

    def history_failed(self, error: GrainsError) -> None:
        """A read or write of the history failed: one line, and the chat goes on."""
        self.notify(str(error), title="Chat history", severity="error", timeout=15)

    @property
    def chat(self) -> VerticalScroll:
        return self.query_one("#chat", VerticalScroll)

    # ---- state shown -----------------------------------------------------------------------

    def refresh_panel(self) -> None:
        profiles = self.library.refresh()
        fits = {profile.name for profile in profiles if self.library.fits(profile)}
        self.query_one(ProfilePanel).show(profiles, fits, self.steering, self.baseline)

    def refresh_status(self) -> None:
        bar = self.query_one(StatusBar)
        plain = "" if self.engine.has_chat_template else " · plain prompt (no chat template)"
        bar.show("model", model_name(self.engine) + plain)
        bar.show("provider", self.engine.provider.removesuffix("ExecutionProvider"))
        bar.show("steering", f"profile {self.steering.label}", highlight=self.steering.profile is not None)
        bar.show("speed", "– tok/s" if self.speed is None else f"{self.speed:.1f} tok/s")
        used = "–" if self.context_used is None else str(self.context_used)
        bar.show("context", f"ctx {used}/{self.engine.max_context}")
        compare = f"COMPARE vs {self.baseline.label}" if self.compare else "compare off"
        bar.show("compare", compare, highlight=self.compare)
        bar.show("history", self.notice, highlight=bool(self.notice))

    def set_steering(self, steering: Steering) -> None:
        self.steering = steering
        self.refresh_panel()
        self.refresh_status()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":
            return self.turn is not None
        if action in ("regenerate", "new_chat", "history"):
            return None if self.turn is not None else True
        return True

    # ---- conversation ----------------------------------------------------------------------

    def model_history(self) -> list[dict]:
        """The messages the model sees: user turns and the (right-column) answers, no baselines."""
        return [] if self.conversation is None else model_messages(self.store.messages(self.conversation.id))

    def show_conversation(self, conversation: Conversation | None) -> None:
        self.conversation = conversation
        self.system_prompt = conversation.system_prompt if conversation else self.system_prompt
        self.sub_title = printable(conversation.title if conversation else "") or "new conversation"

    async def open_conversation(self, conversation_id: int) -> None:
        try:
            conversation = self.store.conversation(conversation_id)
            stored = [] if conversation is None else self.store.messages(conversation_id)
        except GrainsError as error:
            self.history_failed(error)
            return
        if conversation is None:
            return
        self.show_conversation(conversation)
        await self.chat.remove_children()
        await self.chat.mount_all(list(message_widgets(stored)))
        history = model_messages(stored)
        self.context_used = len(self.engine.chat_ids(history)) if history else None
        self.speed = None
        self.refresh_status()
        self.chat.anchor()

    @on(Composer.Submitted)
    async def send(self, event: Composer.Submitted) -> None:
        text = event.text
        if not text.strip():
            return
        if self.turn is not None:
            self.notify("A reply is still streaming: escape stops it", severity="warning")
            return
        try:  # nothing is shown that isn't stored: if it can't be, the text stays in the box
            if self.conversation is None:
                title = text.strip().splitlines()[0][:60]
                self.show_conversation(
                    self.store.create_conversation(model_name(self.engine), self.system_prompt, title=title)
                )
            message_id = self.store.add_message(self.conversation.id, "user", text)
        except GrainsError as error:
            self.history_failed(error)
            return
        self.query_one(Composer).clear()
        await self.query(Welcome).remove()
        message = UserMessage(text)
        await self.chat.mount(message)
        await self.start_turn((message_id, message))

    async def start_turn(self, user: tuple[int, UserMessage] | None) -> None:
        chosen = [(self.steering, "assistant")]
        if self.compare:
            chosen.insert(0, (self.baseline, "compare"))
        lanes = []
        try:
            history = self.model_history()
            for steering, role in chosen:
                profile, alpha = steering.to_record()
                message_id = self.store.add_message(self.conversation.id, role, "", profile, alpha, complete=False)
                answer = Answer(steering, note="streaming…")
                lanes.append(Lane(self.library.tensor(steering), answer, StoredReply(self.store, message_id)))
        except GrainsError as error:
            self.history_failed(error)
            await self.take_back([lane.reply.message_id for lane in lanes], user)
            return
        self.turn = Turn(lanes, user)  # before mounting: from here on a second send waits and escape stops
        await self.chat.mount(AnswerPair(lanes[0].widget, lanes[1].widget) if self.compare else lanes[0].widget)
        for lane in lanes:
            lane.stream = Markdown.get_stream(lane.widget)
        self.chat.anchor()
        self.turn.worker = self.stream_turn(self.turn, history, self.system_prompt, self.settings)
        self.refresh_bindings()

    @work(thread=True, exit_on_error=False, group="reply")
    def stream_turn(self, turn: Turn, history: list[dict], system_prompt: str, settings: GenerationSettings) -> None:
        try:
            ids, dropped = fit_prompt(self.engine, history, system_prompt, settings.max_new_tokens)
            if dropped:
                note = f"The oldest {dropped} messages no longer fit the model's context; the model doesn't see them"
                self.call_from_thread(self.notify, note, title="Context full")
            tensors = [lane.tensor for lane in turn.lanes]
            turn.stats = interleave(self.engine, ids, tensors, settings, turn.stop, partial(self.stream_piece, turn))
            turn.prompt_tokens = len(ids)
        except Exception as error:  # a failed reply is reported in the app, never fatal to it
            turn.error = str(error) if isinstance(error, GrainsError) else f"{type(error).__name__}: {error}"
        try:
            for lane in turn.lanes:
                lane.reply.finish()
        except GrainsError as error:  # the text is stored; only its "complete" mark is missing
            turn.error = turn.error or str(error)
        self.post_message(TurnEnded(turn))

    def stream_piece(self, turn: Turn, index: int, piece: str) -> None:
        """In the worker: store one piece of answer `index` (its own commit), then send it to the screen."""
        lane = turn.lanes[index]
        lane.reply.add(piece)  # a HistoryError here ends the reply before the piece is shown
        self.post_message(Piece(lane, piece))

    @on(Piece)
    async def show_piece(self, message: Piece) -> None:
        await message.lane.stream.write(printable(message.text))

    @on(TurnEnded)
    async def end_turn(self, message: TurnEnded) -> None:
        turn = message.turn
        for lane in turn.lanes:
            await lane.stream.stop()
        self.turn = None
        if turn.error:
            await self.fail_turn(turn)
        else:
            for lane, stats in zip(turn.lanes, turn.stats, strict=True):
                lane.widget.border_subtitle = reply_note(stats)
            self.speed = sum(stats.tokens_per_second for stats in turn.stats)
            self.context_used = turn.prompt_tokens + max(stats.new_tokens for stats in turn.stats)
        self.refresh_status()
        self.refresh_bindings()

    async def fail_turn(self, turn: Turn) -> None:
        """Keep whatever was shown; an answer that never started is removed, and so is its fresh question."""
        self.notify(turn.error, title="Reply failed", severity="error", timeout=10)
        if any(lane.reply.text for lane in turn.lanes):
            for lane in turn.lanes:
                lane.widget.border_subtitle = "failed"
            return
        first = turn.lanes[0].widget
        await (first.parent if isinstance(first.parent, AnswerPair) else first).remove()
        await self.take_back([lane.reply.message_id for lane in turn.lanes], turn.user)

    async def take_back(self, answer_ids: list[int], user: tuple[int, UserMessage] | None) -> None:
        """Undo a turn that never showed an answer: its rows go, its question goes back into the box."""
        message_ids = answer_ids + ([user[0]] if user is not None else [])
        try:
            if message_ids:
                self.store.delete_messages(message_ids)
        except GrainsError as error:
            self.history_failed(error)
        if user is not None:
            message = user[1]
            await message.remove()
            composer = self.query_one(Composer)
            if not composer.text:
                composer.text = message.typed
                composer.move_cursor(composer.document.end)

    # ---- actions ---------------------------------------------------------------------------

    def action_stop(self) -> None:
        if self.turn is not None:
            self.turn.stop.set()

    async def action_regenerate(self) -> None:
        if self.turn is not None or self.conversation is None:
            return
        try:
            messages = self.store.messages(self.conversation.id)
            users = [index for index, message in enumerate(messages) if message.role == "user"]
            if not users:
                return
            self.store.delete_messages([message.id for message in messages[users[-1] + 1 :]])
        except GrainsError as error:
            self.history_failed(error)
            return
        children = list(self.chat.children)
        last_user = max(index for index, child in enumerate(children) if isinstance(child, UserMessage))
        await self.chat.remove_children(children[last_user + 1 :])
        await self.start_turn(None)

    def action_toggle_compare(self) -> None:
        self.query_one("#compare-switch", Switch).toggle()

    @on(Switch.Changed, "#compare-switch")
    def compare_changed(self, event: Switch.Changed) -> None:
        self.compare = event.value
        self.refresh_status()
        if self.compare and self.baseline == self.steering:
            self.notify(
                "Both columns would answer alike: apply a profile (enter) or pick another left column (c)",
                severity="warning",
            )

    def action_alpha(self, steps: int) -> None:
        if self.steering.profile is None:
            self.notify("Pick a profile first: 'none' has no strength", severity="warning")
            return
        step = alpha_step(self.library.get(self.steering.profile).alpha)
        self.set_steering(self.steering.stepped(steps, step))

    @on(OptionList.OptionSelected, "#profile-list")
    def profile_selected(self, event: OptionList.OptionSelected) -> None:
        self.select_profile(event.option.id)
        self.query_one(Composer).focus()  # picked: back to writing

    def select_profile(self, name: str | None) -> None:
        """Make `name` (or none) steer the next reply, and show what the switch cost."""
        started = time.perf_counter()
        try:
            steering = self.library.chosen(name)
            self.library.tensor(steering)
        except GrainsError as error:
            self.notify(str(error), severity="error")
            return
        elapsed = (time.perf_counter() - started) * 1000
        self.set_steering(steering)
        self.notify(
            f"{steering.label} steers the next reply · switched in {elapsed:.2f} ms, model not reloaded",
            title="Profile",
        )

    @on(ProfileList.Mix)
    def mix_requested(self, event: ProfileList.Mix) -> None:
        name, steering = event.name, self.steering
        if name is None or name == steering.mix:
            self.set_steering(replace(steering, mix=None, mix_alpha=0.0))
        elif steering.profile is None:
            self.notify("Apply a main profile first (enter), then mix another one into it", severity="warning")
        elif name == steering.profile:
            self.notify(f"{name} is the main profile: highlight another one to mix in", severity="warning")
        else:
            try:
                profile = self.library.get(name)
            except GrainsError as error:
                self.notify(str(error), severity="error")
                return

            def mixed(alpha: float | None) -> None:
                if alpha is not None:
                    self.set_steering(replace(self.steering, mix=profile.name, mix_alpha=alpha))

            self.push_screen(MixScreen(profile.name, profile.alpha), mixed)

    @on(ProfileList.Baseline)
    def baseline_requested(self, event: ProfileList.Baseline) -> None:
        try:
            self.baseline = self.library.chosen(event.name)
        except GrainsError as error:
            self.notify(str(error), severity="error")
            return
        self.refresh_panel()
        if self.compare:
            self.refresh_status()
        else:
            self.action_toggle_compare()

    def action_toggle_panel(self) -> None:
        panel = self.query_one(ProfilePanel)
        panel.display = not panel.display
        if not panel.display and panel.has_focus_within:
            self.query_one(Composer).focus()

    async def action_new_chat(self) -> None:
        if self.turn is not None:
            return
        self.show_conversation(None)
        await self.chat.remove_children()
        await self.chat.mount(Welcome())
        self.speed = self.context_used = None
        self.refresh_status()
        self.query_one(Composer).focus()

    def action_history(self) -> None:
        if self.turn is None:
            current = self.conversation.id if self.conversation else None
            self.push_screen(HistoryScreen(self.store, current), self.history_closed)

    async def history_closed(self, conversation_id: int | None) -> None:
        if conversation_id is not None:
            await self.open_conversation(conversation_id)

    def action_settings(self) -> None:
        def saved(settings: GenerationSettings | None) -> None:
            if settings is not None:
                self.settings = settings
                self.notify(
                    f"temperature {settings.temperature:g} · top-p {settings.top_p:g} · "
                    f"max tokens {settings.max_new_tokens}",
                    title="Settings",
                )

        self.push_screen(SettingsScreen(self.settings, self.engine.max_context), saved)

    def action_system_prompt(self) -> None:
        def saved(prompt: str | None) -> None:
            if prompt is not None:
                self.system_prompt = prompt
                if self.conversation is not None:
                    try:
                        self.store.set_system_prompt(self.conversation.id, prompt)
                    except GrainsError as error:
                        self.history_failed(error)
                self.notify("Applies from the next reply on", title="System prompt")

        self.push_screen(SystemPromptScreen(self.system_prompt), saved)

    def action_copy_answer(self) -> None:
        try:
            messages = self.store.messages(self.conversation.id) if self.conversation else []
        except GrainsError as error:
            self.history_failed(error)
            return
        answers = [printable(m.content) for m in messages if m.role == "assistant" and m.content]
        if not answers:
            self.notify("No answer to copy yet", severity="warning")
            return
        self.copy_to_clipboard(answers[-1])
        self.notify(f"Copied the last answer ({len(answers[-1])} characters)")

    def action_help(self) -> None:
        rows = [(key_name(binding.key), binding.tooltip) for binding in self.BINDINGS]
        self.push_screen(HelpScreen(EXTRA_KEYS + rows))

    async def action_quit(self) -> None:
        """Stop a streaming reply and let it save before leaving."""
        if self.turn is not None and self.turn.worker is not None:
            self.turn.stop.set()
            await self.workers.wait_for_complete([self.turn.worker])
        self.exit()

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for binding in self.BINDINGS:
            if binding.action.isidentifier():  # α steps are keys only
                help_text = f"{binding.tooltip} ({key_name(binding.key)})"
                yield SystemCommand(binding.description, help_text, getattr(self, f"action_{binding.action}"))
        yield SystemCommand(
            "Steer: none", "The unsteered model from the next reply", partial(self.select_profile, None)
        )
        for profile in self.library.refresh():
            if self.library.fits(profile):
                help_text = printable(f"{profile.method} profile at its default α {profile.alpha:g}")
                title = f"Steer: {printable(profile.name)}"
                yield SystemCommand(title, help_text, partial(self.select_profile, profile.name))


def model_messages(messages: list[conversations.Message]) -> list[dict]:
    """What the model is sent of stored messages: user turns and the (right-column) answers, no baselines."""
    return [{"role": m.role, "content": m.content} for m in messages if m.role in ("user", "assistant")]


def message_widgets(messages: list[conversations.Message]) -> Iterable[UserMessage | Answer | AnswerPair]:
    """Widgets of stored messages; a compared turn's baseline pairs with the answer after it."""
    baseline: Answer | None = None
    for message in messages:
        if message.role == "user":
            yield UserMessage(message.content)
            continue
        note = "" if message.complete else "interrupted"
        try:
            steering = Steering.from_record(message.profile, message.alpha)
        except ValueError:  # a profile column this version did not write: shown as it is
            steering = Steering(message.profile, message.alpha or 0.0)
        answer = Answer(steering, message.content, note)
        if message.role == "compare":
            baseline = answer
        elif baseline is not None:
            yield AnswerPair(baseline, answer)
            baseline = None
        else:
            yield answer
    if baseline is not None:
        yield baseline


def run_chat(
    engine: ChatEngine,
    profile: str | None = None,
    alpha: float | None = None,
    resume: bool = False,
    store: ConversationStore | None = None,
    settings: GenerationSettings | None = None,
    system_prompt: str = "",
) -> int:
    """Open the chat on a loaded engine; `profile` (a name or a path, None: unsteered) steers from the start.

    Returns the exit code: non-zero when the app ended on an unhandled error (Textual printed it).
    """
    library = ProfileLibrary((engine.num_layers, engine.hidden_size), fingerprint=engine.manifest.weights_fingerprint)
    library.refresh()
    steering = library.chosen(profile, alpha)
    store, notice = (store, "") if store is not None else open_store(paths.db_path())
    if notice:
        print(f"grains-edge: {printable(notice)}", file=sys.stderr)
    app = ChatApp(engine, store, library, steering, resume, settings, system_prompt, notice)
    try:
        app.run()
    finally:
        store.close()
    return app.return_code or 0
