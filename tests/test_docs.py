"""The documents a user reads point at files that exist: every relative link and image of the README and
docs/, and every committed result a backticked `results/...` path names."""

import re
from pathlib import Path

DOCUMENTS = [Path("README.md"), *sorted(Path("docs").glob("*.md"))]


def test_every_relative_link_resolves():
    checked, missing = 0, []
    for document in DOCUMENTS:
        links = re.findall(r"\]\(([^)\s]+)\)", document.read_text())
        local = [link.split("#")[0] for link in links if not re.match(r"[a-z]+:|#", link)]
        checked += len(local)
        missing += [f"{document}: {link}" for link in local if not (document.parent / link).exists()]
    assert checked >= 10  # the README's figure and docs/results.md's are among them
    assert not missing, f"links to missing files: {missing}"


def test_every_committed_result_named_exists():
    # a figure's source: `results/NAME/FILE.json` (commands' outputs such as `--out results/x` are folders
    # that a rerun writes, so only files with an extension are held to exist)
    checked, missing = 0, []
    for document in DOCUMENTS:
        named = set(re.findall(r"`(results/[\w./-]+\.(?:json|md|png|jsonl))`", document.read_text()))
        checked += len(named)
        missing += [f"{document}: {path}" for path in sorted(named) if not Path(path).exists()]
    assert checked >= 10
    assert not missing, f"results named but not in the repository: {missing}"
