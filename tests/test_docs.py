"""The documentation matches the code: the generated recipe reference is current, every hook and
every built-in parameter is documented, every built-in has a paper section, and every relative
link and image in the Markdown resolves (anchors included)."""

import os
import re
from pathlib import Path

import pytest

from dllm_decode.tools import docs_reference
from dllm_decode.plugins import PluginInfo, PluginMeta, get_plugin_manager, list_plugins

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted(DOCS.glob("*.md")),
         ROOT / "examples" / "plugin-eb-sampler" / "README.md"]
REGENERATE = "run `python -m dllm_decode.tools.docs_reference --write` and commit docs/reference.md"


@pytest.fixture(scope="module")
def builtins():
    return docs_reference.builtin_plugins(list_plugins(get_plugin_manager()))


def _section(text, heading):
    """The text under a Markdown heading, up to the next heading of the same or a higher level."""
    level = heading.split(" ")[0]
    start = text.index(heading + "\n")
    nxt = re.search(rf"^#{{1,{len(level)}}} ", text[start + len(heading):], flags=re.M)
    return text[start: start + len(heading) + (nxt.start() if nxt else len(text))]


def test_reference_matches_the_code():
    assert (DOCS / "reference.md").read_text() == docs_reference.render(), REGENERATE


def test_every_hook_is_documented():
    reference, concepts = (DOCS / "reference.md").read_text(), (DOCS / "concepts.md").read_text()
    for name, fn in docs_reference.hook_specs():
        assert (fn.__doc__ or "").strip(), f"hookspec {name} has no docstring"
        assert f"### `{name}`" in reference, f"{name} missing from docs/reference.md; {REGENERATE}"
        assert f"`{name}`" in concepts, f"hook {name} is not described in docs/concepts.md"


def test_every_builtin_parameter_is_documented(builtins):
    reference = (DOCS / "reference.md").read_text()
    assert {i.name for i in builtins} >= {"llada", "threshold", "dream", "slowfast", "apd", "none",
                                         "kv_block", "dllm_cache", "slowfast_tail"}
    for info in builtins:
        section = _section(reference, f"### `{info.name}`")
        for row in docs_reference.parameter_rows(info.meta.options):
            assert f"| `{row['name']}` |" in section, f"{info.name}.{row['name']} undocumented; {REGENERATE}"
            assert row["description"], f"{info.name}.{row['name']} has no description"
    generation = _section(reference, "### `generation`")
    for row in docs_reference.parameter_rows(docs_reference.GenerationConfig):
        assert f"| `{row['name']}` |" in generation, f"generation.{row['name']} undocumented; {REGENERATE}"


def test_every_builtin_is_related_to_its_paper(builtins):
    papers = (DOCS / "papers.md").read_text()
    missing = [i.name for i in builtins if f"## `{i.name}`" not in papers]
    assert not missing, f"docs/papers.md has no section for {missing}"


def test_other_distributions_stay_out_of_the_reference():
    fake = [PluginInfo(name="third_party", distribution="someone-elses-plugin", version="1.0", slots=("score",),
                       observers=(), meta=PluginMeta(summary="not ours")),
            PluginInfo(name="registered_directly", distribution=None, version=None, slots=("score",),
                       observers=(), meta=PluginMeta())]
    real = list_plugins(get_plugin_manager())
    text = docs_reference.render(real + fake)
    assert "third_party" not in text and "registered_directly" not in text
    assert text == docs_reference.render(real)


# ----------------------------------------------------------------------------- links


def _slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path):
    seen, out = {}, set()
    for line in _strip_fences(path.read_text()).splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            slug = _slug(m.group(1))
            out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return out


def _strip_fences(text):
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def _strip_code(text):
    return re.sub(r"`[^`\n]*`", "", _strip_fences(text))         # and inline code


def _links(path):
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", _strip_code(path.read_text()))


def _broken_links(page):
    broken = []
    for target in _links(page):
        if re.match(r"[a-z]+:", target):                           # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading with anchor #{anchor})")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    broken = _broken_links(page)
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_the_link_check_can_fail(tmp_path):
    (tmp_path / "other.md").write_text("# Title\n\n## A `code` heading\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a-code-heading) [gone](missing.md) [bad](other.md#nope) "
                    "![img](pic.png) `[code](ignored.md)` [web](https://example.org)\n")
    assert _broken_links(page) == ["missing.md (no such file)", "other.md#nope (no heading with anchor #nope)",
                                   "pic.png (no such file)"]


def test_the_slug_rule():
    assert _slug("`kv_block` (Fast-dLLM §3.3-3.5)") == "kv_block-fast-dllm-33-35"
    assert _slug("Adding a policy or a cache") == "adding-a-policy-or-a-cache"


# ----------------------------------------------------------------------------- file references

# Files another change rewrites as a whole; each still names a file the repository does not hold.
# The test below fails once that reference is gone, so the entry cannot outlive its reason.
PENDING_REFERENCES: dict[str, str] = {}
PROJECT_DIRS = ("docs", "recipes", "models", "scripts", "tests", "examples", "policies", "caches", "dllm_decode")


def _file_references(text):
    """Relative file names a text mentions: any ``NAME.md``, and any path under one of the
    repository's top-level folders. URLs, placeholders (``models/NAME``) and the reader's own
    files (``my-recipe.yaml``) are not references."""
    text = re.sub(r"https?://\S+", "", text)
    refs = set(re.findall(r"(?<![\w/.-])((?:\.\./)*[\w./-]*\.md)\b", text))
    refs |= set(re.findall(rf"(?<![\w/.-])((?:{'|'.join(PROJECT_DIRS)})/[\w./*-]*)", text))
    return {r.rstrip(".") for r in refs
            if not re.search(r"(^|/)my[-_]|(^|/)[A-Z]+(/|$)", r.rstrip("."))}


def _dangling(path, text):
    roots = [path.parent, ROOT, DOCS]
    # a file no longer shipped, named with the command that restores it from the history
    restored = set(re.findall(r"git checkout [0-9a-f]{7,40} -- ([\w./-]+)", text))
    return sorted(r for r in _file_references(text) - restored
                  if not any(list(base.glob(r)) if "*" in r else (base / r).exists() for base in roots))


# tests that write the files they name into a temporary folder or an installed wheel
_NAMES_OWN_FILES = {"test_docs.py", "test_packaging.py", "test_policy_report.py"}
REFERENCING = [ROOT / "README.md", *sorted(DOCS.glob("*.md")),
               *sorted(p for d in ("dllm_decode", "policies", "caches", "tests", "examples", "scripts")
                       for p in (ROOT / d).rglob("*.py") if p.name not in _NAMES_OWN_FILES)]


@pytest.mark.parametrize("page", REFERENCING, ids=lambda p: str(p.relative_to(ROOT)))
def test_file_references_exist(page):
    rel = page.relative_to(ROOT).as_posix()
    dangling = _dangling(page, page.read_text())
    if rel in PENDING_REFERENCES:
        assert PENDING_REFERENCES[rel] in dangling, f"{rel} is fixed: remove it from PENDING_REFERENCES"
        dangling.remove(PENDING_REFERENCES[rel])
    assert not dangling, f"{rel} names files the repository does not hold: {dangling}"


def test_the_reference_check_can_fail(tmp_path):
    page = tmp_path / "page.py"
    text = ('"""See DESIGN.md §3, docs/nowhere.md, recipes/llada.yaml, README.md, tests/reference_*.py,\n'
            'models/NAME, recipes/my-policy.yaml, https://example.org/X.md and docs/models.md."""\n')
    assert _dangling(page, text) == ["DESIGN.md", "docs/nowhere.md"]
    gone = "measured on models/gone (no longer shipped)"
    assert _dangling(page, gone) == ["models/gone"]
    assert _dangling(page, gone + ": git checkout 0123abc -- models/gone restores it") == []


# ----------------------------------------------------------------------------- documented examples

EXAMPLE_PAGES = [ROOT / "README.md", DOCS / "quickstart.md"]


def _examples(text):
    """(language, code, shown output) of every ```bash / ```python block followed directly by a
    ```text block, and the files of ```yaml blocks whose first line is ``# NAME.yaml``."""
    blocks = re.findall(r"^```(\w*)\n(.*?)^```\n", text, flags=re.M | re.S)
    found, files = [], {}
    for (lang, code), (next_lang, shown) in zip(blocks, blocks[1:] + [("", "")]):
        if lang in ("bash", "python") and next_lang == "text":
            found.append((lang, code, shown))
        head = code.split("\n", 1)[0]
        if lang == "yaml" and re.fullmatch(r"# [\w.-]+\.yaml", head):
            files[head[2:]] = code
    return found, files


def _example_plugin_site(root):
    """The example third-party plugin as the docs install it (``pip install
    examples/plugin-eb-sampler``), without pip: its module and its entry points on a path."""
    from fake_dist import install_fake_distribution

    example = ROOT / "examples" / "plugin-eb-sampler"
    text = (example / "pyproject.toml").read_text()          # tomllib is Python 3.11+
    name = re.search(r'^name = "([^"]+)"', text, flags=re.M).group(1)
    section = text.split("[project.entry-points.dllm_decode]", 1)[1].split("\n[", 1)[0]
    install_fake_distribution(root, name, dict(re.findall(r'^(\w+) = "([^"]+)"', section, flags=re.M)))
    return f"{root}{os.pathsep}{example}"


def _run_example(lang, code, cwd, pythonpath=""):
    import subprocess
    import sys

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": pythonpath}
    cmd = ["bash", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("page", EXAMPLE_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_examples_print_what_they_show(page, tmp_path):
    """Every example with shown output runs on the shipped model and prints exactly that, from a
    directory holding the checkout's models, recipes and examples and the page's own files."""
    examples, files = _examples(page.read_text())
    for name in ("models", "recipes", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    site = _example_plugin_site(tmp_path / "site")
    assert examples, f"{page.name} shows no example output"
    for lang, code, shown in examples:
        out = _run_example(lang, code, tmp_path, site)
        assert out.returncode == 0, f"{page.name}: {code}\n{out.stderr[-2000:]}"
        assert out.stdout == shown, f"{page.name}: {code}\nprints:\n{out.stdout}\nshows:\n{shown}"


@pytest.mark.parametrize("page", EXAMPLE_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_generate_example_shows_its_output(page):
    """A `generate` command on a shipped model (not a synopsis) comes with its output."""
    examples, _ = _examples(page.read_text())
    shown = {code for _, code, _ in examples}
    blocks = re.findall(r"^```(?:bash|python)\n(.*?)^```\n", page.read_text(), flags=re.M | re.S)
    missing = [code for code in blocks if code not in shown
               and ("dllm-decode generate --model models/" in code or "load_model(" in code)]
    assert not missing, f"{page.name}: examples without their output: {missing}"


def test_the_example_check_can_fail(tmp_path):
    text = "```bash\necho hello\n```\n\n```text\nhullo\n```\n"
    (lang, code, shown), = _examples(text)[0]
    assert _run_example(lang, code, tmp_path).stdout != shown


# Where this implementation cannot match the official code by construction; users comparing
# numbers with a paper read policies.md and papers.md, so both say each of these.
DOCUMENTED_DIFFERENCES = {
    "ties go to the lowest column": ["lowest column", "torch.topk"],
    "our own random draws": ["own keyed noise", "never", "draws for the same seed"],
    "forwards that commit nothing are not counted": ["commit nothing", "1,424", "511", "one per block"],
    "float64 models": ["float32", "float64", "1e-4"],
}


@pytest.mark.parametrize("page", ["policies.md", "papers.md"])
def test_known_differences_from_the_official_code_are_documented(page):
    text = re.sub(r"\s+", " ", (DOCS / page).read_text())
    missing = {what: [n for n in needles if n not in text] for what, needles in DOCUMENTED_DIFFERENCES.items()}
    assert not any(missing.values()), f"docs/{page} does not say: {missing}"
