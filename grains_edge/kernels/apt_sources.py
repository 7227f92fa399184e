"""The machine's own Debian package sources, pointed at trixie: `python apt_sources.py /etc/apt` prints them
as deb822 stanzas (nothing when no configured source is a Debian archive).

fetch_headers.sh downloads libonnxruntime-dev, which only trixie (and later) has, through the mirrors this
machine already uses: each `deb` source in sources.list, sources.list.d/*.list (one-line format) and
sources.list.d/*.sources (deb822) whose suite is a Debian release keeps its URIs and options (Signed-By,
Architectures, …) with the suite trixie and the component main. Security, updates and backports suites and
other distributions' sources (an Ubuntu mirror has no trixie) are left out.
"""

from __future__ import annotations

import sys
from pathlib import Path

SUITE = "trixie"
DEBIAN_RELEASES = frozenset(
    {"buster", "bullseye", "bookworm", "trixie", "forky", "sid"}
    | {"oldoldstable", "oldstable", "stable", "testing", "unstable"}
)
# one-line options whose deb822 field has another name; the rest only differ in case, which apt ignores
ONE_LINE_OPTIONS = {"arch": "Architectures", "lang": "Languages", "target": "Targets"}
PLACED = {"types", "uris", "suites", "components", "enabled"}  # fields this script writes itself


def deb822_stanzas(text: str) -> list[dict[str, str]]:
    """Field name -> value (continuation lines kept, with their leading space) of each stanza."""
    stanzas, fields, name = [], {}, None
    for line in [*text.splitlines(), ""]:
        if line.startswith("#"):
            continue
        if not line.strip():
            if fields:
                stanzas.append(fields)
            fields, name = {}, None
        elif line[0] in " \t" and name is not None:
            fields[name] += "\n" + line
        elif ":" in line:
            name, value = line.split(":", 1)
            name = name.strip()
            fields[name] = value.strip()
    return stanzas


def one_line_stanzas(text: str) -> list[dict[str, str]]:
    """The one-line entries (`deb [opt=value ...] URI SUITE COMPONENT...`) as deb822 stanzas."""
    stanzas = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        kind, _, rest = line.partition(" ")
        fields = {"Types": kind}
        rest = rest.strip()
        if rest.startswith("["):
            options, _, rest = rest[1:].partition("]")
            for option in options.split():
                key, _, value = option.partition("=")
                fields[ONE_LINE_OPTIONS.get(key, key)] = value
        words = rest.split()
        if len(words) >= 2:
            stanzas.append({**fields, "URIs": words[0], "Suites": words[1], "Components": " ".join(words[2:])})
    return stanzas


def configured_stanzas(etc_apt: Path) -> list[dict[str, str]]:
    stanzas = one_line_stanzas(read(etc_apt / "sources.list"))
    parts = etc_apt / "sources.list.d"
    for path in sorted(parts.glob("*.list")) if parts.is_dir() else []:
        stanzas += one_line_stanzas(read(path))
    for path in sorted(parts.glob("*.sources")) if parts.is_dir() else []:
        stanzas += deb822_stanzas(read(path))
    return stanzas


def read(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return ""


def field(stanza: dict[str, str], name: str) -> str:
    """A field by name, ignoring case as apt does."""
    return next((value for key, value in stanza.items() if key.lower() == name.lower()), "")


def trixie_sources(etc_apt: Path) -> str:
    """deb822 text: one stanza per distinct Debian source of `etc_apt`, at suite trixie, component main."""
    written, out = set(), []
    for stanza in configured_stanzas(etc_apt):
        if "deb" not in field(stanza, "Types").split() or field(stanza, "Enabled").lower() == "no":
            continue
        if not DEBIAN_RELEASES & set(field(stanza, "Suites").split()):
            continue
        options = [f"{key}: {value}" for key, value in stanza.items() if key.lower() not in PLACED]
        lines = ["Types: deb", f"URIs: {field(stanza, 'URIs')}", f"Suites: {SUITE}", "Components: main", *options]
        if tuple(lines) not in written:
            written.add(tuple(lines))
            out.append("\n".join(lines) + "\n")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(trixie_sources(Path(sys.argv[1] if len(sys.argv) > 1 else "/etc/apt")))
