"""The README cannot drift: its example is scripts/moe_example.py verbatim, and that script
passes on the reference backend under mpiexec -n 4 as the README says to run it."""
import re

from test_reference import REPO, _mpirun

README = REPO / "README.md"
EXAMPLE = REPO / "scripts" / "moe_example.py"


def _readme_example() -> str:
    """The fenced python block that follows the README's `<!-- scripts/moe_example.py -->` marker."""
    m = re.search(r"<!-- scripts/moe_example\.py -->\s*```python\n(.*?)^```", README.read_text(), re.S | re.M)
    assert m, "README.md: no ```python block after <!-- scripts/moe_example.py -->"
    return m.group(1)


def test_readme_example_is_the_script():
    assert _readme_example() == EXAMPLE.read_text(), \
        "README.md's example differs from scripts/moe_example.py: copy the script into the README"


def test_example_passes_on_the_reference_backend():
    proc = _mpirun(4, EXAMPLE, "--backend", "reference")
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stdout[-8000:]}"
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("OK: every rank's output matches"), proc.stdout[-4000:]
    assert "4 ranks, reference" in proc.stdout


def test_readme_has_no_internal_references():
    text = README.read_text()
    assert "../shared" not in text, "README.md refers to files outside the repository"
    assert not re.findall(r"nvidia-h[12]00", text), "README.md names internal hosts"
    versions = re.findall(r"(?<!DeepEP )\bv\d+\b", text)
    assert versions == [], f"README.md uses version names {versions} (the package has one version)"


def test_readme_paths_exist():
    """Every link and every docs/ or scripts/ path the README names is in the repository."""
    text = README.read_text()
    links = re.findall(r"\]\(([^)#]+)\)", text)
    paths = re.findall(r"\b((?:docs|scripts|tests)/[\w./-]*\w)", text)
    missing = sorted({p for p in links + paths if not p.startswith("http") and not (REPO / p).exists()})
    assert missing == []


def test_script_table_lists_every_script():
    table = {m for m in re.findall(r"^\| `(scripts/[^`]+)` \|", README.read_text(), re.M)}
    scripts = {f"scripts/{p.name}" for p in (REPO / "scripts").iterdir() if p.suffix in (".py", ".sh")}
    assert scripts - table == set(), "scripts missing from README.md's table"
    assert table - scripts == set(), "README.md's table lists scripts that do not exist"
