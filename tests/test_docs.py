"""The README and the guides in docs/ name only what exists: links resolve, presets, Makefile targets and
modules exist, and every training command they show loads and passes the config checks with its overrides."""

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from autoencoder.config import AutoencoderConfig
from autoencoder.config import check_config as check_autoencoder_config
from ldm.engine.config import load_config
from ldm.trainer.config import LDMConfig, check_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _code(text: str) -> list[str]:
    """Shell lines of the fenced code blocks, continuation lines joined, comments dropped."""
    blocks, block, language = [], None, ""
    for line in text.splitlines():
        if line.startswith("```"):
            if block is not None and language in ("", "bash", "sh"):
                blocks.append("\n".join(block))
            block, language = (None, "") if block is not None else ([], line[3:].strip())
        elif block is not None:
            block.append(line)
    lines = []
    for block in blocks:
        lines += [line.split(" # ")[0].strip() for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line]


def test_readme_is_a_short_guide():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_resolve(doc):
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path) if path else doc
        assert file.exists(), f"{doc.name}: link to missing {target}"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", file.read_text(), re.M)
            assert anchor in {_slug(h) for h in headings}, f"{doc.name}: no heading for #{anchor} in {file.name}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_named_files_targets_and_modules_exist(doc):
    text = doc.read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    code = "\n".join(_code(text)) + "\n" + "\n".join(re.findall(r"`([^`\n]+)`", text))
    for target in re.findall(r"(?:^|\s)make ([a-z][\w-]*)", code, re.M):
        assert target in targets, f"{doc.name}: `make {target}` is not a Makefile target"
    for module in re.findall(r"python -m ([a-z_][\w.]*)", code):
        parts = module.split(".")
        assert (ROOT.joinpath(*parts).with_suffix(".py").exists()
                or ROOT.joinpath(*parts, "__main__.py").exists()), f"{doc.name}: no module {module}"
    for preset in re.findall(r"configs/[\w/.-]+\.yaml", text):
        assert (ROOT / preset).exists(), f"{doc.name}: no preset {preset}"


def _training_commands():
    for doc in DOCS:
        for line in _code(doc.read_text()):
            script = next((s for s in ("train_ldm.py", "train_autoencoder.py") if s in line), None)
            tokens = shlex.split(line) if script else []
            if "--config" in tokens and tokens[tokens.index("--config") + 1].endswith(".yaml"):
                at = tokens.index("--config")
                yield pytest.param(script, tokens[at + 1], [t for t in tokens[at + 2:] if "=" in t],
                                   id=f"{doc.name}:{tokens[at + 1]}:{len(tokens)}")


@pytest.mark.parametrize("script,preset,overrides", list(_training_commands()))
def test_documented_training_commands_pass_the_config_checks(script, preset, overrides, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for value in (o.split("=", 1)[1] for o in overrides):
        if value.endswith("/") and not value.startswith("/"):  # a user's folder of images, e.g. my_dog/
            Path(value).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(Path(value) / "0.png")
    cls, check = ((LDMConfig, check_config) if script == "train_ldm.py"
                  else (AutoencoderConfig, check_autoencoder_config))
    check(load_config(cls, ROOT / preset, overrides))
