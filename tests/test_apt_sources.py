"""fetch_headers.sh's package sources: this machine's Debian mirrors with their options, at suite trixie."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from grains_edge.kernels.apt_sources import deb822_stanzas, trixie_sources

DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: https://deb.nodesource.com/node_20.x
Suites: nodistro
Components: main
Architectures: amd64
Signed-By: /usr/share/keyrings/nodesource.gpg
"""
ONE_LINE = """\
# a comment
deb [arch=amd64 signed-by=/etc/apt/keyrings/mirror.gpg] http://mirror.example/debian stable main contrib
deb-src http://mirror.example/debian stable main
deb http://security.debian.org/debian-security bookworm-security main
deb http://archive.ubuntu.com/ubuntu noble main
"""
EMBEDDED_KEY = """\
Types: deb deb-src
URIs: http://inline.example/debian
Suites: sid
Components: main
Signed-By:
 -----BEGIN PGP PUBLIC KEY BLOCK-----
 .
 mDMEZ
 -----END PGP PUBLIC KEY BLOCK-----

Enabled: no
Types: deb
URIs: http://disabled.example/debian
Suites: bookworm
Components: main
"""


def etc_apt(tmp_path, sources_list: str = "", parts: dict[str, str] | None = None):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(sources_list)
    for name, text in (parts or {}).items():
        (tmp_path / "sources.list.d" / name).write_text(text)
    return tmp_path


def test_deb822_and_one_line_sources_keep_their_mirrors_and_options(tmp_path):
    folder = etc_apt(tmp_path, ONE_LINE, {"debian.sources": DEB822, "inline.sources": EMBEDDED_KEY, "x.list.off": ""})
    stanzas = deb822_stanzas(trixie_sources(folder))
    assert [s["URIs"] for s in stanzas] == [
        "http://mirror.example/debian",
        "http://deb.debian.org/debian",
        "http://inline.example/debian",
    ]
    assert all((s["Types"], s["Suites"], s["Components"]) == ("deb", "trixie", "main") for s in stanzas)
    assert stanzas[0]["Architectures"] == "amd64" and stanzas[0]["signed-by"] == "/etc/apt/keyrings/mirror.gpg"
    assert stanzas[1]["Signed-By"] == "/usr/share/keyrings/debian-archive-keyring.gpg"
    assert stanzas[2]["Signed-By"].splitlines()[1:] == [
        " -----BEGIN PGP PUBLIC KEY BLOCK-----",
        " .",
        " mDMEZ",
        " -----END PGP PUBLIC KEY BLOCK-----",
    ]


def test_a_mirror_listed_twice_is_written_once(tmp_path):
    line = "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main\n"
    folder = etc_apt(tmp_path, line, {"debian.sources": DEB822.replace("Signed-By", "signed-by")})
    assert len(deb822_stanzas(trixie_sources(folder))) == 1


def test_no_debian_source_gives_nothing_so_make_falls_back_to_stock_kernels(tmp_path):
    folder = etc_apt(tmp_path, "deb http://archive.ubuntu.com/ubuntu noble main\n")
    assert trixie_sources(folder) == ""
    assert trixie_sources(tmp_path / "missing") == ""


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get")
def test_apt_reads_the_written_sources_as_trixie_of_the_same_mirrors(tmp_path):
    """apt itself parses the file (offline: --print-uris only lists what it would download)."""
    (tmp_path / "etc").mkdir()
    folder = etc_apt(tmp_path / "etc", ONE_LINE, {"debian.sources": DEB822})
    (tmp_path / "trixie.sources").write_text(trixie_sources(folder))
    (tmp_path / "lists" / "partial").mkdir(parents=True)
    options = [f"Dir::Etc::sourcelist={tmp_path}/trixie.sources", "Dir::Etc::sourceparts=-"]
    options.append(f"Dir::State::Lists={tmp_path}/lists")
    command = ["apt-get", *[x for option in options for x in ("-o", option)], "update", "--print-uris"]
    printed = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    releases = sorted(line.split()[0].strip("'") for line in printed.splitlines() if "InRelease" in line)
    assert releases == [
        "http://deb.debian.org/debian/dists/trixie/InRelease",
        "http://mirror.example/debian/dists/trixie/InRelease",
    ]


@pytest.mark.skipif(not (shutil.which("apt-get") and shutil.which("dpkg-deb")), reason="needs apt-get and dpkg-deb")
def test_the_script_fails_cleanly_without_a_debian_source_and_keeps_foreign_headers(tmp_path):
    """Its non-zero exit is what makes `make` fall back to the stock kernels."""
    script = Path(__file__).parents[1] / "grains_edge" / "kernels" / "fetch_headers.sh"
    env = {**os.environ, "PYTHON": "true"}  # a sources list with nothing in it
    failed = subprocess.run(["bash", str(script), str(tmp_path / "a")], env=env, capture_output=True, text=True)
    assert failed.returncode == 1 and "no configured apt source" in failed.stderr and not (tmp_path / "a").exists()
    (tmp_path / "b" / "onnxruntime").mkdir(parents=True)
    (tmp_path / "b" / "onnxruntime" / "mine.h").write_text("// mine")
    refused = subprocess.run(["bash", str(script), str(tmp_path / "b")], capture_output=True, text=True)
    assert refused.returncode == 1 and "was not unpacked by this script; fix:" in refused.stderr
    assert (tmp_path / "b" / "onnxruntime" / "mine.h").read_text() == "// mine"
