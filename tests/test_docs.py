"""The documents a reader steers by name only what exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_path_architecture_names_exists():
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`((?:mmt|tests|docs|benchmarks|examples)/[\w./-]*)`", text))
    # the layout block: one name per line, indented under its folder
    block = text.split("## Layout", 1)[1].split("```")[1]
    folders: list[str] = []
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        names = [n for n in line.strip().split("  ")[0].split() if re.fullmatch(r"[\w.]+/?", n)]
        depth = indent // 2
        folders = folders[:depth]
        for name in names:
            path = "/".join(folders + [name.rstrip("/")])
            named.add(path)
        if names and names[0].endswith("/"):
            folders.append(names[0].rstrip("/"))
    assert len(named) > 30
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"ARCHITECTURE.md names paths the tree lacks: {missing}"


def test_links_between_documents_resolve():
    documents = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken = []
    for doc in documents:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
            if "://" not in target and not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken, broken
