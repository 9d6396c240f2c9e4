"""docs/custom_training.md as tests: every Python block on the page runs as written.

Each block is a complete program marked ``<!-- runnable -->`` (its asserts are the claims
the page makes); a Python block without the marker fails the first test, so nothing on
the page goes untested.
"""

import re
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parent.parent / "docs" / "custom_training.md"
TEXT = PAGE.read_text()
FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
RUNNABLE = re.compile(r"^<!-- runnable -->\n```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _blocks() -> list[tuple[str, str]]:
    """(id, code) of each runnable block, named after the section it is in."""
    found = []
    for m in RUNNABLE.finditer(TEXT):
        prose = FENCE.sub("", TEXT[: m.start()])  # a comment in a block is no heading
        heading = re.findall(r"^#+ (.+)$", prose, re.MULTILINE)[-1]
        slug = re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")[:40]
        found.append((f"{len(found)}-{slug}", m.group(1)))
    return found


BLOCKS = _blocks()


def test_every_python_block_on_the_page_is_marked_runnable():
    assert len(FENCE.findall(TEXT)) == len(BLOCKS)
    assert len(BLOCKS) >= 12  # the forms, the programs, metrics, calls, steps, keys


def test_the_page_names_every_program_it_promises():
    for name in ["lm1b", "VAE", "NNX tutorial", "ResNet", "MoE", "transfer", "GAN", "EMA",
                 "float16", "MultiSteps", "MeanAveragePrecision", "AUC", "fold_in"]:
        assert name in TEXT, name


def test_the_readme_links_the_page_and_lists_the_open_step_examples():
    readme = (PAGE.parent.parent / "README.md").read_text()
    section = readme.split("## Custom training logic\n", 1)[1].split("\n## ", 1)[0]
    assert "(docs/custom_training.md)" in section
    assert [r.split("|")[1].strip() for r in section.splitlines() if r.startswith("| ") and "`" in r] == [
        "simple loss", "full-form loss", "custom step"]
    for script in ["vae.py", "transformer_lm.py", "gan.py"]:
        assert f"| `examples/{script}` |" in readme
        assert (PAGE.parent.parent / "examples" / script).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("code", [c for _, c in BLOCKS], ids=[i for i, _ in BLOCKS])
def test_block_runs(code):
    # In this process, one block after another: JAX is imported and warmed up once. Each
    # block gets a fresh namespace, so none leans on another's names.
    exec(compile(code, str(PAGE), "exec"), {"__name__": "__docs__"})  # noqa: S102 - the page's own code
