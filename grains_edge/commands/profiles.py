"""`grains-edge profiles`: list, show, remove, mix, and move profiles to and from llama.cpp control vectors.

Light on purpose (no torch at import): listing profiles starts in well under a second.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from grains_edge.errors import GrainsError
from grains_edge.options import finite_float

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def register(subparsers) -> None:
    parser = subparsers.add_parser("profiles", help="list, show, remove, mix, import or export behaviour profiles")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list", help="every profile: name, method, layers, α, built-in/user, model fingerprint")
    show = actions.add_parser("show", help="all of a profile's metadata, with its tuning table summed up")
    show.add_argument("name", help="profile NAME or PATH")
    remove = actions.add_parser("rm", help="delete a user profile (never a built-in one)")
    remove.add_argument("name", help="user profile NAME")
    mix = actions.add_parser("mix", help="save a·P + b·Q as a new user profile")
    mix.add_argument("name", help="the new profile's NAME")
    mix.add_argument(
        "--term",
        action="append",
        required=True,
        type=mix_term,
        metavar="PROFILE=WEIGHT",
        help="a profile and its weight, repeated (weight w steers at w × the profile's own α)",
    )
    mix.add_argument("--force", action="store_true", help="replace a user profile of that name, or shadow a built-in")
    export = actions.add_parser("export", help="write a profile as a llama.cpp / repeng GGUF control vector")
    export.add_argument("name", help="profile NAME or PATH")
    export.add_argument("out", help="the .gguf file to write")
    export.add_argument("--model-hint", default=None, help="HF model_type for the file (default: from the export)")
    export.add_argument("--drop-layer-0", action="store_true", help="export without layer 0 (llama.cpp refuses it)")
    export.add_argument("--force", action="store_true", help="replace an existing file")
    imported = actions.add_parser("import", help="save a GGUF control vector (llama.cpp, repeng) as a user profile")
    imported.add_argument("file", help="the .gguf control vector")
    imported.add_argument("--name", default=None, help="the new profile's NAME (default: the file's)")
    imported.add_argument("--model", default="default", help="the model it steers (its layers and hidden size)")
    imported.add_argument("--alpha", type=finite_float, default=None, help="default strength (default: the file's)")
    imported.add_argument("--force", action="store_true", help="replace a user profile of that name")
    parser.set_defaults(run=run)


def mix_term(text: str) -> tuple[str, float]:
    """PROFILE=WEIGHT (argparse type)."""
    name, equals, weight = text.rpartition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"'{text}' is not PROFILE=WEIGHT; fix: e.g. --term truthful=1")
    return name, finite_float(weight)


def layers_text(layers: list[int]) -> str:
    """13-17 for a run of layers, else 1,4,9."""
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(str(layer) for layer in layers)


def list_all() -> int:
    from grains_edge import paths
    from grains_edge.steer.profiles import SUFFIX, list_profiles, load_profile

    rows = [("NAME", "METHOD", "LAYERS", "ALPHA", "KIND", "FINGERPRINT")]
    for profile in list_profiles():
        kind = "built-in" if profile.builtin else "user"
        fingerprint = profile.metadata.get("fingerprint") or "-"
        rows.append(
            (profile.name, profile.method, layers_text(profile.layers), f"{profile.alpha:g}", kind, fingerprint)
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    folder = paths.profiles_dir()
    for path in sorted(folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []:
        try:
            load_profile(str(path))
        except GrainsError as error:
            print(f"skipped: {error}")
    return 0


def tuning_summary(text: str) -> list[str]:
    """A few lines on the tuning search: items, the layer sets and α scored, the chosen setting against
    unsteered (tables of the earlier grid tune, with `tune_items` and a chosen `ppl`, read too)."""
    try:
        tuning = json.loads(text)
        sweep = tuning.get("sweep", [])
        chosen = tuning.get("chosen") or {}
        alphas = sorted({float(row["alpha"]) for row in sweep})
        sets = list(dict.fromkeys(str(row["layers"]) for row in sweep))
        lines = [
            f"{tuning.get('items', tuning.get('tune_items'))} scored items, {tuning.get('ppl_items')} perplexity "
            f"items, {len(sweep)} settings ({sum(bool(row.get('admissible')) for row in sweep)} admissible)",
            f"layer sets: {'; '.join(sets) or 'none'}",
            f"α scored: {f'{alphas[0]:g} to {alphas[-1]:g}' if alphas else 'none'}",
            f"unsteered: behaviour {tuning.get('unsteered', {}).get('behaviour')}, "
            f"perplexity {tuning.get('unsteered', {}).get('ppl')}",
        ]
        if "ppl_rise" in chosen:  # the frontier search's table: changes against unsteered
            lines.append(
                f"chosen: layers {chosen['layers']}, α {chosen['alpha']:.4g}, behaviour {chosen['behaviour']:+.4f} "
                f"(cross-validated {chosen['cv_behaviour']:+.4f}), perplexity {100 * chosen['ppl_rise']:+.2f} %"
            )
        elif chosen:  # the grid tune's: levels
            lines.append(
                f"chosen: layers {chosen.get('layers')}, α {chosen.get('alpha')}, behaviour {chosen.get('behaviour')}, "
                f"perplexity {chosen.get('ppl')}"
            )
        return lines
    except (ValueError, TypeError, AttributeError, KeyError):
        return ["(unreadable tuning table)"]


def show(name: str) -> int:
    from grains_edge.steer.profiles import load_profile, tuned_range

    profile = load_profile(name)
    low, high = tuned_range(profile)
    print(f"name: {profile.name}")
    print(f"file: {profile.path} ({'built-in' if profile.builtin else 'user'})")
    print(f"method: {profile.method}")
    print(f"layers: {layers_text(profile.layers)} of {profile.vectors.shape[0]} (hidden {profile.vectors.shape[1]})")
    print(f"alpha: {profile.alpha:g} (tuned range [{low:g}, {high:g}])")
    shown = {"name", "method", "layers", "alpha", "tuning"}
    for key in sorted(set(profile.metadata) - shown):
        print(f"{key}: {profile.metadata[key]}")
    if "tuning" in profile.metadata:
        print("tuning:")
        for line in tuning_summary(profile.metadata["tuning"]):
            print(f"  {line}")
    return 0


def user_path(name: str) -> Path:
    """Where user profile `name` lives; refuses names that are paths."""
    from grains_edge import paths
    from grains_edge.steer.profiles import SUFFIX

    if not NAME.fullmatch(name) or name.endswith(SUFFIX):
        raise GrainsError(f"'{name}' is not a profile name; fix: use letters, digits, '.', '-' or '_'")
    return paths.profiles_dir() / f"{name}{SUFFIX}"


def provably_ours(path: Path) -> bool:
    """True when `path` is a regular file in the profiles folder that reads as a grains-edge profile."""
    from grains_edge import paths
    from grains_edge.steer.profiles import load_profile

    if path.is_symlink() or not path.is_file() or path.parent.resolve() != paths.profiles_dir().resolve():
        return False
    try:
        profile = load_profile(str(path))
    except GrainsError:
        return False
    return bool(profile.metadata.get("created") and profile.metadata.get("method"))


def remove(name: str) -> int:
    from grains_edge.steer.profiles import BUILTIN_DIR, SUFFIX

    path = user_path(name)
    if not path.exists() and not path.is_symlink():
        builtin = (BUILTIN_DIR / f"{name}{SUFFIX}").is_file()
        why = "is built in and cannot be removed" if builtin else "is not a user profile"
        raise GrainsError(f"profile '{name}' {why}; fix: 'grains-edge profiles list' shows the user profiles")
    if not provably_ours(path):
        raise GrainsError(
            f"{path} is not a profile grains-edge wrote, so it is left alone; fix: delete it yourself if you mean to"
        )
    path.unlink()
    print(f"removed {path}")
    return 0


def writable(name: str, force: bool) -> Path:
    """The path to save user profile `name`, refusing to replace what --force does not allow."""
    from grains_edge.steer.profiles import BUILTIN_DIR, SUFFIX

    path = user_path(name)
    if path.exists() or path.is_symlink():
        if not force:
            raise GrainsError(f"profile '{name}' exists ({path}); fix: pick another name or pass --force")
        if not provably_ours(path):
            raise GrainsError(
                f"{path} is not a profile grains-edge wrote, so it is not replaced; fix: pick another name"
            )
    elif (BUILTIN_DIR / f"{name}{SUFFIX}").is_file():
        if not force:
            raise GrainsError(
                f"'{name}' is a built-in profile; fix: pick another name, or pass --force to shadow it with yours"
            )
        print(f"note: your '{name}' shadows the built-in profile of that name ('profiles rm {name}' undoes it)")
    return path


def mix(name: str, terms: list[tuple[str, float]], force: bool) -> int:
    from grains_edge.steer.profiles import load_profile, mixed, save_profile

    path = writable(name, force)
    profile = mixed(name, [(load_profile(term), weight) for term, weight in terms])
    save_profile(profile, path)
    print(f"wrote {path}: {profile.metadata['description']} (layers {layers_text(profile.layers)}, α 1)")
    return 0


def export(name: str, out: str, model_hint: str | None, drop_layer_0: bool, force: bool) -> int:
    from grains_edge.export.manifest import Manifest
    from grains_edge.runtime.bootstrap import export_dir_for
    from grains_edge.steer.control_vectors import export_gguf
    from grains_edge.steer.profiles import load_profile

    profile = load_profile(name)
    target = Path(out).expanduser()
    if target.suffix != ".gguf":
        raise GrainsError(f"{out} does not end in .gguf; fix: name the file like {profile.name}.gguf")
    if target.exists() and not force:
        raise GrainsError(f"{target} exists; fix: pick another file or pass --force")
    if model_hint is None:
        export_dir = export_dir_for(profile.metadata.get("model") or "default")
        if not Manifest.is_current(export_dir):
            raise GrainsError(
                f"no export of the model of '{profile.name}' to read its type from; fix: pass --model-hint llama"
            )
        model_hint = Manifest.load(export_dir).architecture
    written = export_gguf(profile, target, model_hint, drop_layer_0)
    dropped = " (layer 0 dropped)" if 0 in profile.layers else ""
    print(f"wrote {target}: direction.{layers_text(written)}{dropped}, model_hint {model_hint}")
    print(f"llama.cpp: --control-vector-scaled {target} {profile.alpha:g}")
    return 0


def import_file(file: str, name: str | None, model: str, alpha: float | None, force: bool) -> int:
    from grains_edge.export.manifest import Manifest
    from grains_edge.runtime.bootstrap import ensure_export
    from grains_edge.steer.control_vectors import import_gguf
    from grains_edge.steer.profiles import check_fits, save_profile

    manifest = Manifest.load(ensure_export(model))
    profile = import_gguf(file, manifest.num_layers, manifest.hidden_size, name)
    path = writable(profile.name, force)
    hint = profile.metadata.get("model_hint")
    if hint not in (None, "unknown", manifest.architecture):
        print(f"[grains-edge] warning: {file} was made for a '{hint}' model, this one is '{manifest.architecture}'")
    check_fits(profile, manifest.num_layers, manifest.hidden_size, manifest.weights_fingerprint)
    if alpha is not None:
        profile.alpha = alpha
    save_profile(profile, path)
    print(f"wrote {path}: layers {layers_text(profile.layers)}, α {profile.alpha:g}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        return list_all()
    if args.action == "show":
        return show(args.name)
    if args.action == "rm":
        return remove(args.name)
    if args.action == "mix":
        return mix(args.name, args.term, args.force)
    if args.action == "export":
        return export(args.name, args.out, args.model_hint, args.drop_layer_0, args.force)
    return import_file(args.file, args.name, args.model, args.alpha, args.force)
