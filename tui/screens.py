"""Modal screens: help, generation settings, system prompt, history, mixing in a second profile."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.screen import ModalScreen
from textual.validation import Integer, Number
from textual.widgets import Button, Input, Label, OptionList, TextArea
from textual.widgets.option_list import Option

from grains_edge.errors import GrainsError
from grains_edge.runtime.protocol import GenerationSettings
from grains_edge.safe_text import printable
from grains_edge.store.conversations import Conversation, ConversationStore


class Dialog(ModalScreen):
    """A centred box with a title; escape closes it without a result."""

    BINDINGS = [Binding("escape", "dismiss", "Close")]
    BOX_TITLE = ""

    def compose_body(self) -> ComposeResult:
        yield from ()

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog") as box:
            box.border_title = self.BOX_TITLE
            yield from self.compose_body()


class HelpScreen(Dialog):
    BOX_TITLE = "Keys"
    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close")]

    def __init__(self, rows: list[tuple[str, str]]):
        super().__init__()
        self.rows = rows

    def compose_body(self) -> ComposeResult:
        with VerticalScroll(), Grid(id="keys"):
            for key, action in self.rows:
                yield Label(key, classes="key")
                yield Label(action)
        yield Label("escape closes", classes="hint")


class SettingsScreen(Dialog):
    """Temperature, top-p, max new tokens and seed for the next replies."""

    BOX_TITLE = "Generation settings"
    BINDINGS = [Binding("escape", "dismiss", "Cancel"), Binding("ctrl+s", "save", "Save")]

    def __init__(self, settings: GenerationSettings, max_context: int):
        super().__init__()
        self.settings = settings
        self.max_context = max_context

    def compose_body(self) -> ComposeResult:
        settings = self.settings
        seed = "" if settings.seed is None else str(settings.seed)
        with Grid(id="settings-grid"):
            yield Label("Temperature  [dim]0 = greedy[/]")
            yield Input(str(settings.temperature), id="temperature", validators=[Number(0, 5)])
            yield Label("Top-p  [dim]1 = off[/]")
            yield Input(str(settings.top_p), id="top-p", validators=[Number(0.01, 1)])
            yield Label(f"Max new tokens  [dim]1–{self.max_context}[/]")
            yield Input(str(settings.max_new_tokens), id="max-tokens", validators=[Integer(1, self.max_context)])
            yield Label("Repetition penalty  [dim]1 = off[/]")
            yield Input(str(settings.repetition_penalty), id="repetition-penalty", validators=[Number(1, 2)])
            yield Label("Seed  [dim]empty = random[/]")
            yield Input(seed, id="seed", validators=[Integer(0)])
        yield Label("", id="settings-error", classes="error")
        with Horizontal(classes="buttons"):
            yield Button("Save  ctrl+s", variant="primary", id="save")
            yield Button("Cancel", id="cancel")

    @on(Input.Submitted)
    @on(Button.Pressed, "#save")
    def action_save(self) -> None:
        inputs = {field.id: field for field in self.query(Input)}
        for name, field in inputs.items():
            result = field.validate(field.value)
            if (name != "seed" or field.value.strip()) and result and not result.is_valid:
                self.query_one("#settings-error", Label).update(f"{name}: {result.failure_descriptions[0]}")
                field.focus()
                return
        seed = inputs["seed"].value.strip()
        self.dismiss(
            GenerationSettings(
                max_new_tokens=int(inputs["max-tokens"].value),
                temperature=float(inputs["temperature"].value),
                top_p=float(inputs["top-p"].value),
                seed=int(seed) if seed else None,
                repetition_penalty=float(inputs["repetition-penalty"].value),
            )
        )

    @on(Button.Pressed, "#cancel")
    def cancel(self) -> None:
        self.dismiss(None)


class SystemPromptScreen(Dialog):
    BOX_TITLE = "System prompt"
    BINDINGS = [Binding("escape", "dismiss", "Cancel"), Binding("ctrl+s", "save", "Save")]

    def __init__(self, prompt: str):
        super().__init__()
        self.prompt = prompt

    def compose_body(self) -> ComposeResult:
        yield TextArea(printable(self.prompt), id="system-prompt", soft_wrap=True)  # it may come from a file
        yield Label("Applies from the next reply on. Empty: the model's default.", classes="hint")
        with Horizontal(classes="buttons"):
            yield Button("Save  ctrl+s", variant="primary", id="save")
            yield Button("Cancel", id="cancel")

    @on(Button.Pressed, "#save")
    def action_save(self) -> None:
        self.dismiss(self.query_one("#system-prompt", TextArea).text.strip())

    @on(Button.Pressed, "#cancel")
    def cancel(self) -> None:
        self.dismiss(None)


def conversation_prompt(conversation: Conversation, current: bool) -> Content:
    title = printable(conversation.title) or "(untitled)"
    when = conversation.last_active.replace("T", " ")[:16]
    details = f"{when} · {conversation.message_count} messages" + (" · open now" if current else "")
    return Content.assemble(title, "\n", (details, "dim"))


class HistoryScreen(Dialog):
    """Past conversations, most recent first: enter reopens one, d deletes it."""

    BOX_TITLE = "Conversations"
    BINDINGS = [Binding("escape", "dismiss", "Close"), Binding("d,delete", "delete", "Delete")]

    def __init__(self, store: ConversationStore, current: int | None):
        super().__init__()
        self.store = store
        self.current = current

    def compose_body(self) -> ComposeResult:
        try:
            conversations = self.store.conversations()
        except GrainsError as error:  # shown in the dialog: the chat goes on
            yield Label(printable(str(error)), classes="error", markup=False)
            return
        options = [Option(conversation_prompt(c, c.id == self.current), id=str(c.id)) for c in conversations]
        yield OptionList(*options, id="history-list")
        yield Label("enter open · d delete · escape close" if options else "No conversations yet.", classes="hint")

    @on(OptionList.OptionSelected)
    def open(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(int(event.option.id))

    def action_delete(self) -> None:
        options = self.query_one(OptionList) if self.query(OptionList) else None
        option = None if options is None else options.highlighted_option
        if options is None or option is None:
            return
        if int(option.id) == self.current:
            self.notify("The open conversation can't be deleted here; start a new one first", severity="warning")
            return
        try:
            self.store.delete_conversation(int(option.id))
        except GrainsError as error:
            self.notify(str(error), severity="error")
            return
        options.remove_option(option.id)


class MixScreen(Dialog):
    """The strength at which a second profile is added to the active one."""

    BOX_TITLE = "Mix in a second profile"

    def __init__(self, name: str, alpha: float):
        super().__init__()
        self.profile_name = name
        self.alpha = alpha

    def compose_body(self) -> ComposeResult:
        yield Label(Content.from_markup("Add [b]$name[/b] at strength α:", name=printable(self.profile_name)))
        yield Input(f"{self.alpha:g}", id="mix-alpha", validators=[Number(-3, 3)])
        yield Label("enter apply · escape cancel", classes="hint")

    @on(Input.Submitted)
    def apply(self, event: Input.Submitted) -> None:
        if event.validation_result is None or event.validation_result.is_valid:
            self.dismiss(float(event.value))
        else:
            self.notify("α is a number from -3 to 3", severity="error")
