"""The repository's promises about itself: requirements.txt lists every package the code imports (an optional tool
only inside the function that uses it, and in requirements-dev.txt), and the README's links and file names point at
things that exist."""
import ast
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# import name -> the name pip installs it under, where the two differ
PACKAGE_NAMES = {"yaml": "pyyaml", "PIL": "pillow", "sklearn": "scikit-learn", "cv2": "opencv-python",
                 "bs4": "beautifulsoup4", "google": "protobuf", "lm_eval": "lm-eval"}
# bench.py measures us against the reference implementations, which are development dependencies
DEV_IMPORTS = {"bench.py": {"transformers"}, "bench_serve.py": {"transformers", "lm-eval"}}
# optional tools (loggers.py's trackers, --log_to): imported only inside the function that uses them, when asked for,
# so a user without them runs everything else; requirements-dev.txt lists them for the tests
OPTIONAL_IMPORTS = {"tensorboard", "wandb", "swanlab"}


def normalized(name):
    """A package name as pip compares them (PEP 503): case, '-', '_' and '.' do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(name):
    """The package names a requirements file lists, following `-r OTHER` lines."""
    packages = set()
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        for line in f:
            line = line.split(" #")[0].strip()
            if line.startswith("-r"):
                packages |= requirements(line[2:].strip())
            elif line and not line.startswith(("#", "-")):
                packages.add(normalized(re.split(r"[<>=!~\[;@ ]", line)[0]))
    return packages


def top_level_files():
    return sorted(n for n in os.listdir(ROOT) if n.endswith(".py"))


def import_nodes(tree):
    """(import statement, whether it is inside a function body) for every import in the tree, in line order."""
    found, stack = [], [(tree, False)]
    while stack:
        node, in_function = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append((node, in_function))
        function = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        stack.extend((child, in_function or function) for child in ast.iter_child_nodes(node))
    return sorted(found, key=lambda pair: pair[0].lineno)


def third_party_imports(path, project):
    """{package name: (line, only inside functions)} of every import in the file, at any depth, that is neither stdlib
    nor a project module; the line is a module-level import's where there is one."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found = {}
    for node, in_function in import_nodes(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules = [node.module]
        else:
            continue
        for module in modules:
            top = module.split(".")[0]
            if top not in sys.stdlib_module_names and top not in project:
                package = normalized(PACKAGE_NAMES.get(top, top))
                line, only_in_functions = found.get(package, (node.lineno, True))
                if only_in_functions and not in_function:
                    line, only_in_functions = node.lineno, False
                found[package] = (line, only_in_functions)
    return found


def test_requirements_list_every_import():
    runtime, dev = requirements("requirements.txt"), requirements("requirements-dev.txt")
    project = {name[:-3] for name in top_level_files()}
    missing = []
    for name in top_level_files():
        allowed_dev = {normalized(p) for p in DEV_IMPORTS.get(name, ())}
        for package, (line, only_in_functions) in third_party_imports(os.path.join(ROOT, name), project).items():
            optional = only_in_functions and package in OPTIONAL_IMPORTS and package in dev
            listed = package in runtime or (package in allowed_dev and package in dev) or optional
            if not listed:
                where = "" if only_in_functions or package not in OPTIONAL_IMPORTS else " (an optional tool: import " \
                    "it inside the function that uses it, and list it in requirements-dev.txt)"
                missing.append(f"{name}:{line} imports {package}{where}")
    assert not missing, "not in requirements.txt: " + "; ".join(missing)
    assert "torch" in runtime and "numpy" in runtime  # the parser read the file


def test_requirements_parser_and_import_scan(tmp_path):
    """The checks above can fail: a made-up import is found, with its line, and a mapped name is mapped."""
    source = tmp_path / "x.py"
    source.write_text("import os\nimport json.decoder\n\ndef f():\n    from yaml import safe_load\n"
                      "    import not_a_real_package.sub\n    from . import sibling\n    import model\n"
                      "    import wandb\nclass A:\n    def g(self):\n        import swanlab\nimport wandb\n")
    found = third_party_imports(str(source), {"model"})
    # wandb: imported in f() too, but the module-level import (line 13) is the one that makes it a requirement
    assert found == {"pyyaml": (5, True), "not-a-real-package": (6, True), "swanlab": (12, True), "wandb": (13, False)}


# -----------------------------------------------------------------------------
# README.md


def readme_lines():
    """README.md's lines, each with whether it is inside a fenced code block."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        lines, fenced = [], False
        for line in f.read().splitlines():
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            lines.append((line, fenced))
    return lines


def github_anchor(heading, seen):
    """The id GitHub gives a heading: lowercased, punctuation but '-' and '_' dropped, spaces to '-', and a
    repeated id numbered -1, -2, ..."""
    anchor = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
    count = seen.get(anchor, 0)
    seen[anchor] = count + 1
    return anchor if count == 0 else f"{anchor}-{count}"


def readme_anchors():
    seen = {}
    return {github_anchor(line.lstrip("#"), seen) for line, fenced in readme_lines()
            if not fenced and re.match(r"#{1,6} ", line)}


def test_github_anchor():
    seen = {}
    assert github_anchor(" GGUF export (llama.cpp, Ollama)", seen) == "gguf-export-llamacpp-ollama"
    assert github_anchor(" HDF5 layout (format_version 1)", seen) == "hdf5-layout-format_version-1"
    assert github_anchor(" HDF5 layout (format_version 1)", seen) == "hdf5-layout-format_version-1-1"


def test_readme_links_resolve():
    anchors, text = readme_anchors(), "\n".join(line for line, _ in readme_lines())
    assert {"install", "quickstart", "files"} <= anchors  # the headings were read
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith("#"):
            if target[1:] not in anchors:
                broken.append(f"{target}: no such heading")
        elif not re.match(r"[a-z]+:", target) and not os.path.exists(os.path.join(ROOT, target.split("#")[0])):
            broken.append(f"{target}: no such file in the repository")
    assert not broken, "README.md links: " + "; ".join(broken)


def readme_repo_paths():
    """Paths the README names that look like files of this repository: anything under configs/, tests/ or .ci/,
    a lowercase name.py in backticks, and the script of every `python name.py` command."""
    text = "\n".join(line for line, _ in readme_lines())
    paths = set(re.findall(r"(?<![\w/.])((?:configs|tests|\.ci)/[\w./-]*\w)", text))
    for span in re.findall(r"`([^`\n]+)`", text):
        paths |= set(re.findall(r"(?<![\w/.])([a-z0-9_]+\.py|requirements[\w-]*\.txt|chat\.html)\b", span))
    paths |= set(re.findall(r"\bpython ([a-z0-9_]+\.py)\b", text))
    return paths


def test_readme_names_only_files_that_exist():
    paths = readme_repo_paths()
    assert {"configs/demo.py", "pipeline.py", ".ci/run"} <= paths  # the scan found what the quickstart names
    missing = sorted(p for p in paths if not os.path.exists(os.path.join(ROOT, p)))
    assert not missing, f"README.md names files that are not in the repository: {missing}"
    outside = re.findall(r"\.\./[\w./-]+", "\n".join(line for line, _ in readme_lines()))
    assert not outside, f"README.md names paths outside the repository: {outside}"
