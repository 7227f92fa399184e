"""The chat's widgets: messages, the side-by-side answer pair, the input box, the status bar, the profile panel.

Every text that comes from outside (model output, stored history, profile files) passes through
`printable` on its way in, so no control character or escape sequence reaches the terminal. Text is
given to Textual as Content or Markdown, never as markup, so "[bold]" in it stays literal.
"""

from __future__ import annotations

from markdown_it import MarkdownIt
from markdown_it.rules_core import StateCore
from textual import events
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.message import Message
from textual.widgets import Label, Markdown, OptionList, Static, Switch, TextArea
from textual.widgets.option_list import Option

from grains_edge.safe_text import printable
from grains_edge.steer.profiles import Profile
from grains_edge.tui.steering import Steering, format_alpha

WELCOME = """\
### Steer the model while you talk

Type a message and press **enter** (**ctrl+j** for a new line). The panel on the right picks the behaviour
profile of the next reply: **tab** to reach it, **enter** to apply one, **ctrl+↑/↓** for its strength α. No
reload: the switch takes a fraction of a millisecond. **ctrl+t** answers every prompt twice, side by side,
with and without the profile. **f1** lists all keys, **ctrl+p** searches every command.
"""


def hard_line_breaks(state: StateCore) -> None:
    for token in state.tokens:
        for child in token.children or ():
            if child.type == "softbreak":
                child.type = "hardbreak"


def chat_parser() -> MarkdownIt:
    """GitHub-flavoured Markdown where a single newline breaks the line: models write poems and addresses so."""
    parser = MarkdownIt("gfm-like")
    parser.core.ruler.push("hard_line_breaks", hard_line_breaks)
    return parser


def answer_title(steering: Steering) -> Content:
    return Content("unsteered" if steering.profile is None else printable(steering.label))


class UserMessage(Markdown):
    BORDER_TITLE = "you"

    def __init__(self, text: str):
        super().__init__(printable(text), parser_factory=chat_parser)
        self.typed = text  # as the user wrote it: what goes back into the message box


class Answer(Markdown):
    """One assistant answer; its border names the steering that produced it."""

    def __init__(self, steering: Steering, text: str = "", note: str = ""):
        super().__init__(printable(text), parser_factory=chat_parser)
        self.border_title = answer_title(steering)
        self.border_subtitle = note


class AnswerPair(Horizontal):
    """The two answers of a compared turn: baseline on the left, the active steering on the right."""

    def __init__(self, left: Answer, right: Answer):
        super().__init__(left, right)
        self.left = left
        self.right = right


class Welcome(Markdown):
    def __init__(self) -> None:
        super().__init__(WELCOME)


class Composer(TextArea):
    """The message box: enter sends, ctrl+j or shift+enter starts a new line."""

    class Submitted(Message):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    def __init__(self) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", id="composer")
        self.placeholder = "Message — enter sends · ctrl+j new line"

    def _on_paste(self, event: events.Paste) -> None:
        """Insert a paste with its control characters as stand-ins: a TextArea draws them raw."""
        event.prevent_default()  # instead of TextArea's own paste
        event.stop()
        result = self.replace(printable(event.text), *self.selection)
        self.move_cursor(result.end_location)

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self.text))
        elif event.key in ("ctrl+j", "shift+enter"):
            event.stop()
            event.prevent_default()
            self.insert("\n")
        else:
            await super()._on_key(event)


class StatusBar(Horizontal):
    """One line: model, execution provider, steering, speed of the last reply, context used, compare mode,
    and a notice when the chat history is not the usual file or is read-only."""

    SEGMENTS = ("model", "provider", "steering", "speed", "context", "history", "compare")

    def compose(self):
        for name in self.SEGMENTS:
            yield Label(id=f"status-{name}", classes="segment")

    def show(self, name: str, text: str, highlight: bool = False) -> None:
        label = self.query_one(f"#status-{name}", Label)
        label.update(Content(printable(text)))
        label.set_class(highlight, "-on")
        label.display = bool(text)


class ProfileList(OptionList):
    """Profiles to steer with; enter applies the highlighted one to the next reply."""

    BINDINGS = [
        Binding("plus,equals_sign", "app.alpha(1)", "α+"),
        Binding("minus", "app.alpha(-1)", "α−"),
        Binding("m", "mix", "Mix in"),
        Binding("c", "baseline", "Compare against"),
    ]

    class Mix(Message):
        def __init__(self, name: str | None):
            super().__init__()
            self.name = name

    class Baseline(Message):
        def __init__(self, name: str | None):
            super().__init__()
            self.name = name

    def highlighted_name(self) -> str | None:
        option = self.highlighted_option
        return None if option is None or option.id == "none" else option.id

    def action_mix(self) -> None:
        self.post_message(self.Mix(self.highlighted_name()))

    def action_baseline(self) -> None:
        self.post_message(self.Baseline(self.highlighted_name()))


def layer_span(layers: list[int]) -> str:
    """[8, 9, 10] -> "8-10"; anything not contiguous as a list."""
    if layers and layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers)) or "none"


def profile_about(profile: Profile | None) -> Content:
    """What the highlighted profile is: method, layers, default strength, the author's description."""
    if profile is None:
        return Content.styled("The model as it is: no steering.", "dim")
    facts = f"{profile.method} · layers {layer_span(profile.layers)} · α {profile.alpha:g}"
    description = printable(str(profile.metadata.get("description", "")))
    return Content.assemble((printable(facts), "dim"), f"\n{description}" if description else "")


def profile_prompt(name: str, kind: str, mark: str, width: int) -> Content:
    return Content.assemble(f"{mark} {printable(name):<{width}} ", (kind, "dim"))


def profile_mark(name: str | None, steering: Steering) -> str:
    """● the active profile, + the one mixed into it."""
    return "●" if steering.profile == name else "+" if name is not None and steering.mix == name else " "


class ProfilePanel(Vertical):
    """The steering panel: profiles, strength α, the mixed-in profile, compare mode and its baseline."""

    def compose(self):
        yield ProfileList(id="profile-list")
        yield Static(id="about")
        yield Static(id="alpha")
        yield Static(id="mix")
        with Horizontal(id="compare-row"):
            yield Switch(id="compare-switch")
            yield Label("Compare", id="compare-label")
        yield Static(id="baseline")

    def __init__(self, id: str):
        super().__init__(id=id)
        self.border_title = "Steering"
        self.profiles: dict[str, Profile] = {}  # shown, by name

    def show(self, profiles: list[Profile], fits: set[str], steering: Steering, baseline: Steering) -> None:
        self.profiles = {profile.name: profile for profile in profiles}
        options = self.query_one(ProfileList)
        highlighted = options.highlighted
        width = min(18, max((len(name) for name in self.profiles), default=4))
        entries = [Option(profile_prompt("none", "unsteered", profile_mark(None, steering), width), "none")]
        for profile in profiles:
            kind = ("builtin" if profile.builtin else "user") if profile.name in fits else "other model"
            prompt = profile_prompt(profile.name, kind, profile_mark(profile.name, steering), width)
            entries.append(Option(prompt, id=profile.name, disabled=profile.name not in fits))
        options.set_options(entries)
        active = [entry.id for entry in entries].index(steering.profile or "none")
        keep = options.has_focus and highlighted is not None and highlighted < len(entries)
        options.highlighted = highlighted if keep else active
        alpha = "—" if steering.profile is None else format_alpha(steering.alpha, signed=True)
        self.query_one("#alpha", Static).update(Content.from_markup("α $alpha   [dim]+/- · ctrl+↑/↓[/]", alpha=alpha))
        mix = (
            "—"
            if steering.mix is None
            else printable(f"{steering.mix} α{format_alpha(steering.mix_alpha, signed=True)}")
        )
        self.query_one("#mix", Static).update(Content.from_markup("mix $mix   [dim]m[/]", mix=mix))
        left = answer_title(baseline)
        self.query_one("#baseline", Static).update(Content.from_markup("left column: $left   [dim]c[/]", left=left))

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        self.query_one("#about", Static).update(profile_about(self.profiles.get(event.option.id)))
