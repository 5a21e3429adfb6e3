"""The Docker image installs the plugins `make install` installs: both read the folders of plugins/.
Docker cannot run here, so the Dockerfile's own build commands are run by a shell with `pip` standing in
as a recorder, in a directory laid out as its COPY lines lay out the build stage; `make -n` prints what
`make install` would run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined and comments left out."""
    logical, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def stages(dockerfile: Path) -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for op, args in instructions(dockerfile):
        if op == "FROM":
            out.append([])
        out[-1].append((op, args))
    return out


def dockerfile_wheel_args(root: Path, tmp: Path, extra: str = "") -> list[str]:
    """What the build stage's `pip wheel` is handed, by the shell that runs the RUN line."""
    build = stages(root / "Dockerfile")[0]
    workdir = tmp / "src"
    workdir.mkdir(parents=True)
    for op, args in build:
        if op == "COPY":
            *sources, dest = args.split()
            assert not dest.startswith("/"), "the build stage copies into its WORKDIR"
            for source in sources:
                target = workdir / dest / Path(source).name if dest.endswith("/") else workdir / dest
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.exists():
                    target.symlink_to(root / source)
    [wheel] = [args for op, args in build if op == "RUN" and "pip wheel" in args]
    recorder = 'pip() { printf "%s\\n" "$@"; }\n'
    env = {"PATH": os.environ["PATH"], "EXTRA_PLUGINS": extra}
    done = subprocess.run(["sh", "-ec", recorder + wheel], cwd=workdir, env=env, capture_output=True,
                          text=True, check=True)  # fmt: skip
    return done.stdout.splitlines()


def dockerfile_plugins(root: Path, tmp: Path) -> list[str]:
    args = dockerfile_wheel_args(root, tmp)
    return sorted(Path(a).name for a in args if a.startswith("./plugins/"))


def makefile_plugins(root: Path, tmp: Path) -> list[str]:
    """The plugin folders in the pip command `make install` would run (`make -n`: printed, not run)."""
    done = subprocess.run(
        ["make", "-n", "-B", "install", f"VENV={tmp / 'venv'}", "PYTHON=python3"],
        cwd=root, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return sorted(m.group(1) for m in re.finditer(r"-e 'plugins/([^/']+)/\[test\]'", done.stdout))


def folders(root: Path) -> list[str]:
    return sorted(p.parent.name for p in (root / "plugins").glob("*/pyproject.toml"))


def test_the_image_and_make_install_install_every_plugin_of_the_folder(tmp_path: Path) -> None:
    expected = folders(ROOT)
    assert {"rulesvc-email", "rulesvc-sms", "rulesvc-ads"} <= set(expected)
    assert dockerfile_plugins(ROOT, tmp_path / "docker") == expected
    assert makefile_plugins(ROOT, tmp_path) == expected
    wheel = dockerfile_wheel_args(ROOT, tmp_path / "extra", extra="rulesvc-whatsapp==1.2")
    assert wheel[:4] == ["wheel", "--no-cache-dir", "--wheel-dir", "/wheels"]
    assert "." in wheel and wheel[-1] == "rulesvc-whatsapp==1.2"  # the service itself, and EXTRA_PLUGINS
    final = stages(ROOT / "Dockerfile")[-1]
    assert ("COPY", "--from=build /wheels /wheels") in final
    assert any(op == "RUN" and "pip install" in args and "/wheels/*.whl" in args for op, args in final)


def test_adding_a_plugin_folder_adds_it_to_both(tmp_path: Path) -> None:
    """The folder is the list: a new plugin needs no other edit, and a folder without a pyproject.toml
    is not a plugin for either."""
    root = tmp_path / "repo"
    for name in ("Dockerfile", "Makefile", "pyproject.toml", "README.md"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, root / name)
    (root / "requirements").mkdir()
    (root / "requirements" / "embedded.txt").write_text("")
    (root / "requirements" / "constraints.txt").write_text("")
    (root / "rulesvc").mkdir()
    for plugin in ("rulesvc-email", "rulesvc-whatsapp"):
        (root / "plugins" / plugin).mkdir(parents=True)
        (root / "plugins" / plugin / "pyproject.toml").write_text("[project]\n")
    (root / "plugins" / "notes").mkdir()
    assert dockerfile_plugins(root, tmp_path / "docker") == ["rulesvc-email", "rulesvc-whatsapp"]
    assert makefile_plugins(root, tmp_path) == ["rulesvc-email", "rulesvc-whatsapp"]
